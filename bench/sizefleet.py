"""A small fleet on a real-size model, in one process: N devices x R rounds x T steps, then the export.

    python -m bench.sizefleet --model DIR [--clients 2 --rounds 2 --steps 2 --quant nf4] --json

What runs is `bench.inproc.from_configs`: the coordinator's RoundBook and one `EngineTrainer` per client
config (each loads its own quantized copy of DIR with the side-car, plans its memory and trains on its
own Non-IID slice of the demo's "topic" task), pumped without a broker. The RoundResults are the ones
a real fleet would publish, byte for byte (tests/e2e/test_inproc_equivalence.py). DIR needs a tokenizer
(a random-init preset has none: copy the tiny demo model's, `meerkat tiny-model` prints its dir). The
mask is `meerkat mask build --method random` (calibrating a real-size model on this CPU takes long; it
is cached beside DIR). After the rounds: every device's values checksum against the coordinator's,
then `export_merged` (base "dequantized", dtype "auto": the checkpoint's) and a plain transformers
load of the export with its dtype and the loss on 8 of the first device's examples.

Reported: wall and process CPU time of the rounds, each device's step times (wall and CPU, median),
each device's planner view (weights / fixed / per-sequence, micro-batch), the private RSS (VmRSS -
RssFile) each device's construction added (model load + memory plan, measured around EngineTrainer),
the process's peak RSS (VmHWM, file-backed pages included), checksums, export.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edge_client.engine.procmem import peak_since_start, status_bytes, trim_heap

log = logging.getLogger(__name__)


def _private_mib() -> float:
    """This process's private RSS (VmRSS - RssFile), MiB, after returning freed heap: what is live."""
    trim_heap()
    rss, file, _ = status_bytes()
    return round((rss - file) / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sizefleet", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="local HF causal-LM directory with a tokenizer")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--quant", choices=("nf4", "int8", "none"), default="nf4")
    p.add_argument("--fraction", type=float, default=1e-3, help="random mask fraction (default 0.1%%)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path("sizefleet-out"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.steps < 1:
        p.error("--clients, --rounds and --steps must be >= 1")
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    if not any((args.model / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        p.error(f"--model {args.model}: no tokenizer (copy one in, e.g. the tiny demo model's tokenizer*.json)")
    logging.basicConfig(level=logging.WARNING)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a caller in this process (a test) keeps its own


def _run(args: argparse.Namespace) -> int:
    from bench.demo.demo import DemoConfig, prepare, write_configs
    from bench.inproc import from_configs
    from coordinator.export import export_merged
    from edge_client.engine.planner import plan_memory
    from shared.apply import values_checksum
    from shared.cli import main as meerkat
    from shared.maskfile import load_mask

    model = args.model.resolve()
    mask_path = model.parent / f"{model.name}.mask-{args.fraction:g}.safetensors"  # where prepare() looks
    if not mask_path.exists():
        rc = meerkat(["mask", "build", "--model", str(model), "--method", "random", "--fraction", str(args.fraction),
                      "--out", str(mask_path)])  # fmt: skip
        if rc != 0:
            return rc
    cfg = DemoConfig(clients=args.clients, rounds=args.rounds, steps=args.steps, workdir=args.workdir,
                     quant=args.quant, fraction=args.fraction, batch_size=args.batch_size, seq_len=args.seq_len)  # fmt: skip
    paths = prepare(cfg, model)
    coord_toml, client_tomls = write_configs(cfg, paths, "mqtt://127.0.0.1:1883", "sizefleet")
    for path in client_tomls:  # no held-out evaluation on the devices: only the rounds are timed
        path.write_text(path.read_text().replace("eval_every = 1", "eval_every = 0"))
    import edge_client.service.trainer as trainer_mod

    loaded_mib: list[float] = []
    engine = trainer_mod.EngineTrainer

    class Measured(engine):  # type: ignore[misc,valid-type]
        """EngineTrainer whose construction (model load + memory plan) is measured in private RSS."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            before = _private_mib()
            super().__init__(*a, **kw)
            loaded_mib.append(round(_private_mib() - before, 1))

    t0 = time.monotonic()
    trainer_mod.EngineTrainer = Measured  # type: ignore[misc]
    try:
        fleet = from_configs(coord_toml, client_tomls)
    finally:
        trainer_mod.EngineTrainer = engine  # type: ignore[misc]
    build_s = time.monotonic() - t0
    times: dict[str, list[tuple[float, float]]] = {}
    for name, dev in fleet.devices.items():
        times[name] = []
        step = dev.trainer.step

        def timed(*a: Any, _step: Any = step, _out: list[tuple[float, float]] = times[name], **kw: Any) -> Any:
            w, c = time.perf_counter(), time.process_time()
            res = _step(*a, **kw)
            _out.append((time.perf_counter() - w, time.process_time() - c))
            return res

        dev.trainer.step = timed  # type: ignore[method-assign]
    w0, c0 = time.perf_counter(), time.process_time()
    fleet.run(args.rounds)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    book_sum = values_checksum(fleet.book.values)
    devices: dict[str, Any] = {}
    for (name, dev), loaded in zip(fleet.devices.items(), loaded_mib, strict=True):
        tr: Any = dev.trainer
        # the trainer keeps only (micro-batch, need); the components: the same planner call once more
        plan = plan_memory(tr.loaded.model, tr.cfg.memory_budget_gib, tr.cfg.seq_len, tr.device,
                           sidecar=tr.sidecar, pad_id=tr.dataset.pad_id)  # fmt: skip
        devices[name] = dict(
            checksum=dev.core.checksum, round=dev.core.round, steps=len(times[name]),
            step_s=round(statistics.median(w for w, _ in times[name]), 2),
            step_cpu_s=round(statistics.median(c for _, c in times[name]), 2),
            private_mib_loaded=loaded, micro_batch=tr.micro_batch, planner_need_mib=round((tr.peak_mem_bytes or 0) / 2**20, 1),
            plan_mib={k: round(getattr(plan, f"{k}_bytes") / 2**20, 1)
                      for k in ("budget", "weights", "sidecar", "fixed", "per_seq")},
        )
    mask = load_mask(paths["mask"])
    t1 = time.monotonic()
    out = export_merged(model, mask, fleet.book.values, args.quant, args.workdir / "export", overwrite=True)
    export_s = time.monotonic() - t1
    reload = _reload(out, fleet)
    result = dict(
        bench="sizefleet", model=str(model), quant=args.quant, clients=args.clients, rounds=args.rounds,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, nnz=mask.nnz, threads=args.threads,
        build_s=round(build_s, 1), rounds_wall_s=round(wall, 1), rounds_cpu_s=round(cpu, 1),
        last_round=fleet.book.last_round, coordinator_checksum=book_sum, devices=devices,
        checksums_equal=all(d["checksum"] == book_sum for d in devices.values()),
        peak_rss_mib=round((peak_since_start() or 0) / 2**20, 1), export_dir=str(out), export_s=round(export_s, 1), **reload,
    )  # fmt: skip
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0 if result["checksums_equal"] and fleet.book.last_round == args.rounds - 1 else 1


def _reload(out: Path, fleet: Any) -> dict[str, Any]:
    """The export in plain transformers: its dtype, file size and the loss on one of the fleet's batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.loss import evaluate

    ckpt = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, nothing of meerkat
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    trainer: Any = next(iter(fleet.devices.values())).trainer
    with torch.no_grad():
        loss = evaluate(model, trainer.dataset, limit=8)["loss"]  # in the export's dtype
    if loss is None:
        raise RuntimeError("evaluate returned no loss")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return dict(export_dtype=dtype, export_config_dtype=ckpt.get("torch_dtype") or ckpt.get("dtype"),
                export_mib=round(size / 2**20, 1), export_eval_loss=round(loss, 4))  # fmt: skip


if __name__ == "__main__":
    from bench.demo.demo import _quiet_libraries

    _quiet_libraries()  # from the command line only: it sets the libraries' loggers for the whole process
    sys.exit(main())
