"""Template construction on IXI: an unconditional and an age-conditional learned template.

Dalca et al. (NeurIPS 2019) with :mod:`voxreg.template`: the template starts as the voxel-wise mean
of the (already affinely aligned) training images and is learned jointly with a diffeomorphic
bidirectional VxmDense, with a penalty on the running mean velocity so it stays centred.

    # 2D (121 axial training slices of ixi2d.npz): train both templates (~20 min each on 1 core)
    python examples/template.py train2d --time-budget 1200
    python examples/template.py train2d --conditional --time-budget 1200
    # scores and figures (runs/template2d/); --ship saves the unconditional template model as
    # src/voxreg/models/template2d.safetensors when it is sharper than the voxel-wise mean
    python examples/template.py evaluate2d --ship
    # 3D (121 training volumes, 96x112x96): the unconditional template, its registration
    # network started from the shipped brain3d-diff; then its scores, figures and --ship
    # (src/voxreg/models/template3d.safetensors)
    python examples/template.py train3d --init-from brain3d-diff --time-budget 6900
    python examples/template.py evaluate3d --label-subjects 60 --ship

Measures:

* sharpness: RMS of the gradient magnitude (:func:`voxreg.template.sharpness`, voxel units) of
  the learned template and of the voxel-wise mean, over the whole image and inside the brain
  (voxels where the mean image is above 0.1); the mean of the gradient magnitude as well.
* Dice: the training subjects' label maps are warped onto the template and voted voxel by voxel
  (:func:`voxreg.template.propagate_labels`); each validation subject is registered to the
  template and the template's labels, warped onto it, are scored against its own labels (mean
  Dice over the labels present in both, :func:`voxreg.metrics.mean_dice_present`). "before" is
  the same label map unwarped.
* centring: RMS of the mean displacement over the training subjects next to the RMS of their
  displacements (:func:`voxreg.template.mean_displacement`).

Training runs (checkpoints, history, snapshots) go to ``outputs/template2d`` (``--run-root``);
figures and the numbers to ``runs/template2d`` (``--figures``).

Data: IXI (CC BY-SA 3.0) with DLMUSE labels (CBICA/NiChart); ages from ``ixi/subjects.csv``; see
``voxreg.apps.brain2d.DATA_CREDIT``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxreg import evaluation, plot
from voxreg.apps import brain2d
from voxreg.checkpoint import MODELS_DIR, load_checkpoint, load_template_model, save_model
from voxreg.data.locate import shared_data
from voxreg.nn.template import TemplateCreation
from voxreg.training.template import SNAPSHOT_DIR, train_template

SHIPPED = "template2d"
FEATURES = [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]  # VoxelMorph's defaults
AGES = (30.0, 50.0, 70.0)


def now() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def subject_ages(ids, table: str | Path | None = None) -> np.ndarray:
    """Age of each subject id from ``ixi/subjects.csv`` (NaN when blank)."""
    table = Path(table) if table else shared_data(Path("ixi") / "subjects.csv")
    if table is None or not Path(table).is_file():
        raise FileNotFoundError("no ixi/subjects.csv; give --subjects")
    with open(table, newline="") as handle:
        rows = {r["id"]: r.get("age", "") for r in csv.DictReader(handle)}
    return np.array([float(rows[i]) if rows.get(i) else np.nan for i in ids])


def slice_affine(data: dict[str, Any]) -> np.ndarray:
    """World affine of the axial slices (the 3D grid's, moved to the slice's z)."""
    affine = np.asarray(data["affine_3d"], dtype=np.float64).copy()
    affine[:3, 3] += affine[:3, 2] * float(data["axial_index"])
    return affine


def load_2d(path: str | None) -> dict[str, Any]:
    data = dict(brain2d.load_ixi2d(path))
    with np.load(brain2d.data_path(path)) as npz:
        for key in ("train_ids", "val_ids", "affine_3d", "axial_index"):
            data[key] = np.asarray(npz[key])
    return data


def load_run(path: Path):
    """``(model, history)`` of a template run's checkpoint or model file."""
    model = load_template_model(path)
    history = load_checkpoint(path, model=load_template_model(path)).history
    return model, history


def rot(image: np.ndarray) -> np.ndarray:
    """Axial slice shown anterior up (as examples/brain2d.py)."""
    return np.rot90(image)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def cmd_train2d(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    data = load_2d(args.data)
    images = data["train_images"]
    attributes = None
    names = None
    if args.conditional:
        ages = subject_ages(data["train_ids"], args.subjects)
        keep = np.isfinite(ages)
        images, attributes, names = images[keep], ages[keep], ["age"]
        print(f"{(~keep).sum()} training subjects without an age left out; ages "
              f"{ages[keep].min():.1f}..{ages[keep].max():.1f}, mean {ages[keep].mean():.1f}")
    run = Path(args.run_root) / ("cond" if args.conditional else "uncond")
    print(f"[{now()}] train2d {'conditional' if args.conditional else 'unconditional'}: "
          f"{len(images)} slices, run {run}, lr {args.lr}, batch {args.batch_size}, "
          f"{args.steps_per_epoch} steps/epoch, budget {args.time_budget} s, threads "
          f"{args.threads}", flush=True)
    tic = time.perf_counter()
    model, history = train_template(
        images, attributes, attribute_names=names, nb_features=FEATURES, int_steps=7,
        int_downsize=2, out_dir=run, resume=True, init_seed=args.seed, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
        lambda_=args.lambda_, mean_weight=args.mean_weight, device="cpu", seed=args.seed,
        snapshot_every=args.snapshot_every, affine=slice_affine(data), time_budget=args.time_budget,
        progress=False, metadata={"data": brain2d.DATA_CREDIT, "normalize": "minmax"})
    last = history[-1]
    print(f"[{now()}] done: epoch {last['epoch']}, step {last['step']}, loss {last['loss']:.5g}, "
          f"{time.perf_counter() - tic:.0f} s this call", flush=True)
    return 0


def cmd_train3d(args: argparse.Namespace) -> int:
    from voxreg.apps import brain3d

    torch.set_num_threads(args.threads)
    train = brain3d.load_ixi("train", args.data3d, labels=False)
    affine = np.array([[2.0, 0, 0, -94], [0, 2.0, 0, -128], [0, 0, 2.0, -90], [0, 0, 0, 1]])
    run = Path(args.run_root) / "uncond"
    print(f"[{now()}] train3d: {len(train['images'])} volumes, run {run}, lr {args.lr}, "
          f"int_downsize {args.int_downsize}, budget {args.time_budget} s, threads {args.threads}",
          flush=True)
    tic = time.perf_counter()
    model, history = train_template(
        train["images"], nb_features=FEATURES, int_steps=7, int_downsize=args.int_downsize,
        out_dir=run, resume=True, init_seed=args.seed, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
        lambda_=args.lambda_, mean_weight=args.mean_weight, device="cpu", seed=args.seed,
        snapshot_every=args.snapshot_every, affine=affine, time_budget=args.time_budget,
        init_registration=args.init_from, progress=False,
        metadata={"data": brain3d.DATA_CREDIT, "normalize": "minmax",
                  "init_registration": args.init_from})
    last = history[-1]
    print(f"[{now()}] done: epoch {last['epoch']}, step {last['step']}, loss {last['loss']:.5g}, "
          f"{time.perf_counter() - tic:.0f} s this call", flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def sharpness_table(template: np.ndarray, mean: np.ndarray) -> dict[str, float]:
    brain = mean > 0.1
    return {
        "template_rms_grad": evaluation.sharpness(template),
        "mean_rms_grad": evaluation.sharpness(mean),
        "template_rms_grad_brain": evaluation.sharpness(template, brain),
        "mean_rms_grad_brain": evaluation.sharpness(mean, brain),
        "template_mean_grad": evaluation.sharpness(template, measure="mean"),
        "mean_mean_grad": evaluation.sharpness(mean, measure="mean"),
    }


def _history_summary(history) -> dict[str, Any]:
    last = history[-1]
    return {"epochs": last["epoch"], "steps": last["step"],
            "train_seconds": round(sum(r["seconds"] for r in history), 1),
            "final_loss": last["loss"], "final_mean_disp_rms": last["mean_disp_rms"]}


def figures_2d(model, data, template_labels, mean, out: Path, conditional=None) -> list[Path]:
    paths = []
    template = model.template_image()
    train = data["train_images"]
    picks = [0, 1, 2, 3]
    panels = [rot(mean), rot(template)] + [rot(train[i]) for i in picks]
    titles = ["voxel-wise mean", "learned template"] + [f"train {data['train_ids'][i]}"
                                                        for i in picks]
    path = out / "template2d.png"
    plot.slices(panels, titles=titles, grid=(2, 3), width=10,
                imshow_args={"vmin": 0, "vmax": 1}, save=path)
    paths.append(path)
    # the template's propagated labels, outlined on it
    path = out / "template2d_labels.png"
    plot.overlay(rot(template), rot(template_labels), title="template + propagated labels",
                 save=path)
    paths.append(path)
    # evolution: snapshots
    snaps = sorted((Path(model.run_dir) / SNAPSHOT_DIR).glob("template_epoch*.nii.gz"))
    if snaps:
        from voxreg import io

        chosen = [snaps[int(round(k))] for k in np.linspace(0, len(snaps) - 1, min(5, len(snaps)))]
        images = [rot(mean)] + [rot(io.load_image(p).data) for p in chosen]
        names = ["epoch 0 (mean)"] + [p.name[len("template_"):].split(".")[0] for p in chosen]
        path = out / "template2d_snapshots.png"
        plot.slices(images, titles=names, width=3 * len(images),
                    imshow_args={"vmin": 0, "vmax": 1}, save=path)
        paths.append(path)
    if conditional is not None:
        cond_model = conditional
        ages = evaluation.templates_at(cond_model, list(AGES))
        panels = [rot(a) for a in ages] + [rot(ages[-1] - ages[0])]
        titles = [f"age {a:g}" for a in AGES] + [f"age {AGES[-1]:g} - age {AGES[0]:g}"]
        lim = float(np.abs(ages[-1] - ages[0]).max())
        path = out / "template2d_ages.png"
        plot.slices(panels, titles=titles, cmaps=["gray"] * 3 + ["RdBu_r"], width=13,
                    do_colorbars=True,
                    imshow_args=[{"vmin": 0, "vmax": 1}] * 3 + [{"vmin": -lim, "vmax": lim}],
                    save=path)
        paths.append(path)
    return paths


def cmd_evaluate2d(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    data = load_2d(args.data)
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    train, val = data["train_images"], data["val_images"]
    mean = train.mean(0)
    results: dict[str, Any] = {"date": now(), "threads": args.threads,
                               "note": "CPU, 1 thread, a 3D training running on the same 2 cores"}

    run = Path(args.run_root) / "uncond"
    model, history = load_run(run / "model.safetensors")
    model.run_dir = run
    template = model.template_image()
    sharp = sharpness_table(template, mean)
    centred = evaluation.mean_displacement(model, train)
    tic = time.perf_counter()
    template_labels = evaluation.propagate_labels(model, train, data["train_labels"])
    seconds_labels = time.perf_counter() - tic
    tic = time.perf_counter()
    dice = evaluation.template_dice(model, template_labels, val, data["val_labels"])
    seconds_dice = time.perf_counter() - tic
    # the voxel-wise mean as a template: the labels voted without registration
    mean_labels = evaluation.propagate_labels(
        TemplateCreation(model.inshape, template_init=mean, nb_features=FEATURES), train,
        data["train_labels"])
    from voxreg.metrics import mean_dice_present

    mean_dice = float(np.mean([mean_dice_present(v, mean_labels) for v in data["val_labels"]]))
    results["unconditional"] = {
        "training": _history_summary(history), "sharpness": sharp, "centring": centred,
        "val_subjects": len(val), "dice_before": dice["dice_before"],
        "dice_after": dice["dice_after"], "dice_after_sd": float(np.std(dice["dice_after_per_subject"])),
        "folding_pct": dice["folding_pct"], "dice_mean_image_labels_no_registration": mean_dice,
        "seconds_label_propagation": round(seconds_labels, 2),
        "seconds_register_val": round(seconds_dice, 2),
    }
    print(json.dumps(results["unconditional"], indent=1))

    cond = None
    cond_run = Path(args.run_root) / "cond"
    if (cond_run / "model.safetensors").is_file():
        cond, cond_history = load_run(cond_run / "model.safetensors")
        train_ages = subject_ages(data["train_ids"], args.subjects)
        keep = np.isfinite(train_ages)
        val_ages = subject_ages(data["val_ids"], args.subjects)
        ages = evaluation.templates_at(cond, list(AGES))
        brain = mean > 0.1
        cond_labels = evaluation.propagate_labels(cond, train[keep], data["train_labels"][keep],
                                           train_ages[keep])
        cdice = evaluation.template_dice(cond, cond_labels, val, data["val_labels"], val_ages)
        # how the template changes with age: intensity inside the brain and the dark (CSF)
        # area, ventricles growing with age being the expected trend
        csf = {f"{a:g}": float(((t < 0.25) & brain).sum()) for a, t in zip(AGES, ages)}
        results["conditional"] = {
            "training": _history_summary(cond_history),
            "attribute_center": cond.attribute_center, "attribute_scale": cond.attribute_scale,
            "centring": evaluation.mean_displacement(cond, train[keep], train_ages[keep]),
            "sharpness_at_ages": {f"{a:g}": evaluation.sharpness(t) for a, t in zip(AGES, ages)},
            "dark_voxels_in_brain_at_ages": csf,
            "mean_abs_change_30_to_70_in_brain": float(np.abs(ages[-1] - ages[0])[brain].mean()),
            "dice_before": cdice["dice_before"], "dice_after": cdice["dice_after"],
            "folding_pct": cdice["folding_pct"],
        }
        print(json.dumps(results["conditional"], indent=1))

    paths = figures_2d(model, data, template_labels, mean, out, cond)
    for name in ("history.csv", "loss.png"):
        if (run / name).is_file():
            shutil.copy(run / name, out / f"uncond_{name}")
        if cond is not None and (cond_run / name).is_file():
            shutil.copy(cond_run / name, out / f"cond_{name}")
    results["figures"] = [str(p) for p in paths]

    u = results["unconditional"]
    lines = [
        "| template | RMS grad (all) | RMS grad (brain) | mean grad | Dice before | Dice after "
        "| % folding |",
        "|---|---|---|---|---|---|---|",
        f"| voxel-wise mean | {sharp['mean_rms_grad']:.4f} | {sharp['mean_rms_grad_brain']:.4f} | "
        f"{sharp['mean_mean_grad']:.4f} | {mean_dice:.3f} | - | - |",
        f"| learned | {sharp['template_rms_grad']:.4f} | {sharp['template_rms_grad_brain']:.4f} | "
        f"{sharp['template_mean_grad']:.4f} | {u['dice_before']:.3f} | {u['dice_after']:.3f} | "
        f"{u['folding_pct']:.3f} |",
    ]
    if cond is not None:
        c = results["conditional"]
        lines.append(f"| conditional (age of each val subject) | - | - | - | "
                     f"{c['dice_before']:.3f} | {c['dice_after']:.3f} | {c['folding_pct']:.3f} |")
    table = "\n".join(lines)
    print(table)
    results["table"] = table
    (out / "template2d.json").write_text(json.dumps(results, indent=1))
    (out / "template2d.md").write_text(table + "\n")

    if args.ship:
        if not sharp["template_rms_grad"] > sharp["mean_rms_grad"]:
            print("not shipped: the template is not sharper than the voxel-wise mean")
            return 1
        meta = {
            "description": "2D learned template of IXI axial T1 slices (96x112 at 2 mm, affinely "
                           "aligned to MNI152) with its diffeomorphic bidirectional VxmDense; "
                           "voxreg.template.TemplateCreation (Dalca et al., NeurIPS 2019); load "
                           "with voxreg.template.load_template_model('template2d')",
            "data": brain2d.DATA_CREDIT,
            "normalize": "minmax",
            "input": "slices in [0, 1] (uint8 / 255)",
            "slice_affine": slice_affine(data).tolist(),
            "training": {**_history_summary(history), **(model.metadata or {}).get("training", {})},
            "sharpness_rms_grad": {"template": sharp["template_rms_grad"],
                                   "voxelwise_mean": sharp["mean_rms_grad"]},
            "val_dice_before": u["dice_before"], "val_dice_after": u["dice_after"],
            "val_folding_pct": u["folding_pct"], "val_subjects": len(val),
            "template_labels": "propagated by majority vote of the 121 training label maps "
                               "(not stored)",
        }
        path = save_model(model, MODELS_DIR / f"{SHIPPED}.safetensors", metadata=meta,
                          step=u["training"]["steps"], epoch=u["training"]["epochs"])
        print(f"shipped {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_evaluate3d(args: argparse.Namespace) -> int:
    from voxreg.apps import brain3d

    torch.set_num_threads(args.threads)
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run_root) / "uncond"
    model, history = load_run(run / "model.safetensors")
    train = brain3d.load_ixi("train", args.data3d, labels=True)
    mean = train["images"].mean(0)
    template = model.template_image()
    sharp = sharpness_table(template, mean)
    results: dict[str, Any] = {"date": now(), "training": _history_summary(history),
                               "sharpness": sharp}
    print(json.dumps(results, indent=1), flush=True)
    voters = min(args.label_subjects, len(train["images"]))
    template_labels = evaluation.propagate_labels(model, train["images"][:voters],
                                           train["labels"][:voters])
    results["label_voters"] = voters
    del train
    val = brain3d.load_ixi("val", args.data3d, labels=True)
    count = min(args.val_subjects, len(val["images"]))
    dice = evaluation.template_dice(model, template_labels, val["images"][:count],
                             val["labels"][:count])
    results.update({"val_subjects": count, "dice_before": dice["dice_before"],
                    "dice_after": dice["dice_after"], "folding_pct": dice["folding_pct"]})
    print(json.dumps({k: results[k] for k in ("dice_before", "dice_after", "folding_pct")}))
    plot.volume_slices([mean, template], titles=["voxel-wise mean", "learned template"],
                       save=out / "template3d.png")
    (out / "template3d.json").write_text(json.dumps(results, indent=1))
    for name in ("history.csv", "loss.png"):
        if (run / name).is_file():
            shutil.copy(run / name, out / f"uncond_{name}")
    if args.ship:
        if not (sharp["template_rms_grad"] > sharp["mean_rms_grad"]
                and results["dice_after"] > results["dice_before"]):
            print("not shipped: the template is not sharper than the voxel-wise mean, or "
                  "registering to it does not raise Dice")
            return 1
        meta = {
            "description": "3D learned template of IXI T1 brains (96x112x96 at 2 mm, affinely "
                           "aligned to MNI152) with its diffeomorphic bidirectional VxmDense; "
                           "voxreg.template.TemplateCreation (Dalca et al., NeurIPS 2019); load "
                           "with voxreg.template.load_template_model('template3d')",
            "data": brain3d.DATA_CREDIT,
            "normalize": "minmax",
            "input": "volumes in [0, 1] (uint8 / 255)",
            "affine": [[2.0, 0, 0, -94], [0, 2.0, 0, -128], [0, 0, 2.0, -90], [0, 0, 0, 1]],
            "training": {**results["training"],
                         **(model.metadata or {}).get("training", {}),
                         "init_registration": (model.metadata or {}).get("init_registration")},
            "sharpness_rms_grad": {"template": sharp["template_rms_grad"],
                                   "voxelwise_mean": sharp["mean_rms_grad"]},
            "val_dice_before": results["dice_before"], "val_dice_after": results["dice_after"],
            "val_folding_pct": results["folding_pct"], "val_subjects": count,
            "template_labels": f"propagated by majority vote of {voters} training label maps "
                               "(not stored)",
        }
        path = save_model(model, MODELS_DIR / "template3d.safetensors", metadata=meta,
                          step=results["training"]["steps"],
                          epoch=results["training"]["epochs"])
        print(f"shipped {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="ixi2d.npz (default: the shared copy)")
    p.add_argument("--data3d", default=None, help="the ixi/ folder (default: the shared copy)")
    p.add_argument("--subjects", default=None, help="subjects.csv with ages (default: shared)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train2d", "train3d"):
        t = sub.add_parser(name, help=f"train or continue the {name[-2:]} run")
        three = name == "train3d"
        t.add_argument("--run-root", default=f"outputs/template{name[-2:]}")
        t.add_argument("--epochs", type=int, default=100000, help="most epochs in total")
        t.add_argument("--steps-per-epoch", type=int, default=25 if three else 30)
        t.add_argument("--batch-size", type=int, default=1 if three else 4)
        t.add_argument("--lr", type=float, default=1e-3)
        t.add_argument("--lambda", dest="lambda_", type=float, default=0.01)
        t.add_argument("--mean-weight", type=float, default=1.0)
        t.add_argument("--snapshot-every", type=int, default=2 if three else 20)
        t.add_argument("--time-budget", type=float, default=1200.0, help="seconds of training")
        t.add_argument("--seed", type=int, default=0)
        if three:
            t.add_argument("--int-downsize", type=int, default=2)
            t.add_argument("--init-from", default=None,
                           help="a fresh run's registration network starts from this model's "
                                "weights (e.g. brain3d-diff)")
        else:
            t.add_argument("--conditional", action="store_true", help="condition on age")
    for name in ("evaluate2d", "evaluate3d"):
        e = sub.add_parser(name, help=f"score the {name[-2:]} runs and draw the figures")
        e.add_argument("--run-root", default=f"outputs/template{name[-2:]}")
        e.add_argument("--figures", default=f"runs/template{name[-2:]}")
        shipped = SHIPPED if name == "evaluate2d" else "template3d"
        e.add_argument("--ship", action="store_true",
                       help=f"save the unconditional model as {MODELS_DIR}/{shipped}"
                            ".safetensors if it is sharper than the mean")
        if name == "evaluate3d":
            e.add_argument("--val-subjects", type=int, default=10)
            e.add_argument("--label-subjects", type=int, default=121,
                           help="training subjects whose labels vote for the template's")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"train2d": cmd_train2d, "train3d": cmd_train3d, "evaluate2d": cmd_evaluate2d,
            "evaluate3d": cmd_evaluate3d}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
