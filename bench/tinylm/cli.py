"""`meerkat tiny-model`: build (or fetch from the cache) the project's tiny pretrained LM; write corpus / tasks.

The last stdout line is the model dir (or the corpus / task dir with --write-corpus / --write-task, or a
JSON list of per-task results with --check-tasks).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tiny-model", help="pretrain (or fetch cached) the project's tiny LM; print its dir",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="demo",
                   help="micro | demo | small | medium (alias base; for a GPU) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="recipe seed, uint64 (default: %(default)s)")
    p.add_argument("--out", default=None, help="also copy the model into this dir and print it")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache has this recipe")
    p.add_argument("--threads", type=int, default=0, help="torch threads for this process, 0 = torch's own choice (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="train on auto | cpu | cuda (default: the size's own: cpu, medium auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check-tasks", nargs="?", const="all", default=None, metavar="TASKS",
                   help="fine-tune the (built or cached) model by backprop on each task (comma list; "
                        "alone: every task the size has) and print zero-shot -> after accuracy")
    p.add_argument("--check-steps", type=int, default=100, help="AdamW steps per task for --check-tasks (default: %(default)s)")
    p.add_argument("--check-lr", type=float, default=1e-3, help="AdamW lr for --check-tasks (default: %(default)s)")
    p.add_argument("--write-corpus", metavar="DIR", default=None,
                   help="write per-domain calibration text files (<domain>.jsonl) into DIR and exit")
    p.add_argument("--docs-per-domain", type=int, default=500, help="documents per domain for --write-corpus (default: %(default)s)")
    p.add_argument("--write-task", metavar="NAME", default=None,
                   help="write client JSONL files + task.json for task NAME (sentiment | topic | domain | claim; "
                        "news8 | polarity | nli for small / medium models) and exit")
    p.add_argument("--task-dir", default=None, help="output dir for --write-task")
    p.add_argument("--clients", type=int, default=10, help="clients for --write-task (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha for --write-task (default: %(default)s)")
    p.add_argument("--single-label", type=int, default=0,
                   help="extreme setting: this many clients hold a single label (--write-task; default: %(default)s)")
    p.add_argument("--train", type=int, default=2000, help="training examples over all clients (--write-task; default: %(default)s)")
    p.add_argument("--eval", type=int, default=400, help="eval examples (--write-task; default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.seed < 0 or args.seed >= 2**64:
        raise SystemExit(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.write_corpus is not None:
        from bench.tinylm.corpus import write_corpus

        paths = write_corpus(args.write_corpus, seed=args.seed, docs_per_domain=args.docs_per_domain)
        for path in paths:
            log.info("wrote %s", path)
        print(args.write_corpus)
        return 0
    if args.write_task is not None:
        from bench.tinylm.tasks import write_task

        if args.task_dir is None:
            raise SystemExit("--write-task needs --task-dir DIR")
        try:
            path = write_task(args.task_dir, args.write_task, n_clients=args.clients, alpha=args.alpha,
                              seed=args.seed, n_train=args.train, n_eval=args.eval, n_single=args.single_label)
        except ValueError as exc:
            raise SystemExit(f"--write-task: {exc}") from exc
        print(path.parent)
        return 0
    import torch

    from bench.tinylm.pretrain import get_model_dir, get_spec, resolve_device

    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        get_spec(args.size)
        if args.device is not None:
            resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    try:
        model_dir = get_model_dir(args.size, args.seed, out=args.out, force=args.force,
                                  progress=not args.no_progress, device=args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if args.check_tasks is not None:
        return _check(args, model_dir)
    print(model_dir)
    return 0


def _check(args: argparse.Namespace, model_dir: Any) -> int:
    import json
    from dataclasses import asdict

    from bench.tinylm.check import CheckConfig, check_tasks, format_row

    names = None if args.check_tasks == "all" else [n.strip() for n in args.check_tasks.split(",") if n.strip()]
    try:
        results = check_tasks(model_dir, names, CheckConfig(steps=args.check_steps, lr=args.check_lr, seed=args.seed))
    except ValueError as exc:
        raise SystemExit(f"--check-tasks: {exc}") from exc
    for r in results:
        print(format_row(r))
    print(json.dumps([asdict(r) for r in results]))
    return 0
