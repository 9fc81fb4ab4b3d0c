"""`s4mc` command line: train a run, evaluate a checkpoint, preview the embedded data set.

Thin by design: it parses arguments, loads the typed config and hands over to the library. Errors
the user can fix (bad config keys, missing files, bad data) print as one line and exit with code 2;
anything else is a bug and keeps its traceback. Object-store URIs (s3://) are resolved by a hook the
orchestration layer passes in (`orchestration.train_cli`), so this package never imports boto3.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from s4mc.config import CHOICES, ConfigError, load_config

EPILOG = """examples:
  s4mc train --config experiments/embedded/cutmix_seg_s4mc.yaml
  s4mc train --config experiments/embedded/fixmatch_s4mc.yaml s4mc.neighbourhood=5x5 s4mc.k=2 train.steps=300
  s4mc train --config experiments/embedded/unimatch_s4mc.yaml run.name=again   # resumes if run.dir has a checkpoint
  s4mc preview --out docs/embedded_preview.png
  s4mc pretrain                      # the embedded benchmark's digit encoder (cached, sha256 checked)

overrides are dotted key=value pairs over the schema in s4mc/config.py; choices:
""" + "\n".join(f"  {k}: {', '.join(map(str, v))}" for k, v in CHOICES.items())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s4mc", description="S4MC semi-supervised segmentation",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (resumes from run.dir/checkpoints/last.pt)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", type=Path, help="YAML manifest over the schema defaults")
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    pre = sub.add_parser("pretrain", help="pretrain (or verify the cached) digit encoder of the embedded benchmark",
                         description="Pretrains the encoder that model.pretrained=embedded loads: digit "
                         "classification on the scans reserved from every scene (s4mc/pretrain.py). "
                         "Deterministic; cached under $S4MC_CACHE_DIR (default ~/.cache/s4mc) with its sha256.")
    pre.add_argument("--config", type=Path, default=Path("experiments/embedded/_base.yaml"),
                     help="manifest whose model.backbone / width / deep_stem and data.embedded.seed pick the encoder")
    pre.add_argument("--cache-dir", type=Path, default=None)
    pre.add_argument("overrides", nargs="*", metavar="key=value")
    v = sub.add_parser("preview", help="write a PNG grid of embedded scenes and their masks")
    v.add_argument("--out", type=Path, default=Path("embedded_preview.png"))
    v.add_argument("-n", type=int, default=16)
    return p


def _train(args, resolve: Callable[[str], str] | None) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from s4mc.config import to_yaml

        print(to_yaml(cfg))
        return 0
    for key in ("data.root", "model.pretrained"):
        value = cfg[key.split(".")[0]][key.split(".")[1]]
        if value and str(value).startswith("s3://"):
            if resolve is None:
                raise ConfigError(f"{key}={value!r} is an object-store URI; run the installed `s4mc` "
                                  "command (orchestration.train_cli), which syncs it to a local cache")
            cfg[key.split(".")[0]][key.split(".")[1]] = str(resolve(value))
    from s4mc.train import run_training

    run_training(cfg, resume=not args.no_resume)
    return 0


def _pretrain(args) -> int:
    from s4mc.pretrain import ensure_encoder, verify_encoder
    from s4mc.train.build import embedded_encoder_spec

    cfg = load_config(args.config, args.overrides)
    path = ensure_encoder(embedded_encoder_spec(cfg), args.cache_dir, progress=True)
    meta = verify_encoder(path)
    print(f"{path}\nsha256 {meta['sha256']} | held-out digit accuracy {meta['heldout_accuracy']:.3f} | "
          f"{meta['pretrain_scans']} pretraining scans, none in any scene")
    return 0


def main(argv: list[str] | None = None, resolve: Callable[[str], str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, resolve)
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "preview":
            from s4mc.data.embedded import save_preview

            save_preview(args.out, n=args.n)
            print(f"wrote {args.out}")
            return 0
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # User-fixable input errors are one line; S4MC_DEBUG=1 shows the traceback.
        if os.environ.get("S4MC_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
