"""The VoxelMorph MNIST tutorial, end to end (a thin wrapper around voxreg.apps.tutorial).

Trains VoxelMorph's 2D model on MNIST fives (MSE + 0.05 x Grad('l2'), Adam), then registers
held-out fives, sevens, and fives with intensities multiplied by 5, printing the MSE before and
after registration and the folding, and saving pictures, the loss curve and results.json:

    python examples/mnist_tutorial.py --out outputs/mnist              # trains, about 3 minutes
    python examples/mnist_tutorial.py --out outputs/mnist --use-shipped   # the shipped model

Data split: training on the 863 fives of MNIST's training split, validation on the 892 fives of
its test split (the shared file has too few training fives to hold out the seed's last 1000).
"""

from __future__ import annotations

import argparse

import voxreg.apps.tutorial as tutorials


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/mnist", help="output folder")
    parser.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=40, help="steps of 32 pairs")
    parser.add_argument("--seconds", type=float, default=150.0,
                        help="training time budget in seconds (0: no budget, train all epochs)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--reg-weight", type=float, default=0.05,
                        help="weight of the Grad('l2') smoothness loss")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads "
                             "ran this small model 3-4x slower; 0 keeps torch's setting)")
    parser.add_argument("--data", default=None, help="an mnist.npz, or a folder holding one")
    parser.add_argument("--use-shipped", action="store_true",
                        help="skip training: evaluate the shipped model voxreg.load_model('mnist')")
    parser.add_argument("--model", default=None,
                        help="skip training: evaluate this checkpoint (or shipped model name)")
    parser.add_argument("--save-model", default=None,
                        help="after training, save the model with its metadata there (e.g. "
                             "src/voxreg/models/mnist.safetensors)")
    parser.add_argument("--examples", type=int, default=3, help="example pairs per figure")
    parser.add_argument("--eval-pairs", type=int, default=None,
                        help="register only this many pairs per case (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = "mnist" if args.use_shipped else args.model
    if model is not None and args.save_model:
        raise SystemExit("--save-model needs a training run (no --use-shipped / --model)")
    results = tutorials.mnist_tutorial(
        args.out,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        seed=args.seed,
        time_budget=args.seconds if args.seconds and args.seconds > 0 else None,
        data=args.data,
        progress=not args.no_progress,
        model=model,
        lr=args.lr,
        reg_weight=args.reg_weight,
        batch_size=args.batch_size,
        num_threads=args.threads or None,
        examples=args.examples,
        eval_pairs=args.eval_pairs,
    )
    if args.save_model:
        path = tutorials.save_tutorial_model(results, args.save_model)
        print(f"saved the model to {path}")
    return results


if __name__ == "__main__":
    main()
