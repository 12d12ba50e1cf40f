#!/usr/bin/env python3
"""MedRegA demo: a web UI (default) or batch inference over a MedRegInstruct jsonl (``--batch``).

    torchrun --nproc-per-node=1 src/demo.py                       # web UI on http://127.0.0.1:7860, bundled model
    torchrun --nproc-per-node=1 src/demo.py --model /models/medrega --load-in-8bit
    torchrun --nproc-per-node=4 src/demo.py --batch demo_data/data_file.jsonl --out result
    python3 src/demo.py --batch FILE.jsonl --out DIR              # also fine without torchrun (one process)

Under torchrun each process joins the process group (gloo on CPU, NCCL on GPU ``LOCAL_RANK``); ``--batch`` shards
the records over the ranks, the web UI is served by rank 0. The server binds 127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from internvl.offline import enforce_offline

enforce_offline()  # no hub, no analytics: before anything imports transformers/peft/gradio

# after the offline switches (the hub and gradio read them on import)
from internvl.cli_support import add_generation_arguments, port_number, positive_int, run_cli  # noqa: E402
from internvl.demo.batch import gather_results, read_batch_file, run_batch, stream_path, write_results  # noqa: E402
from internvl.inference import (GenerationSettings, Generator, ModelLoadError, default_dtype,  # noqa: E402
                                init_distributed, load_model_and_tokenizer)
from internvl.io_safety import check_output_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "asset" / "medreg-mini-model"
DEFAULT_EXAMPLES = REPO / "asset" / "examples"

log = logging.getLogger("medrega.demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MedRegA demo: web UI or --batch inference.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="local InternVL-Chat checkpoint directory (default: the bundled asset/medreg-mini-model)")
    add_generation_arguments(p)
    p.add_argument("--batch", type=Path, default=None, help="MedRegInstruct jsonl to answer instead of the web UI")
    p.add_argument("--out", type=Path, default=Path("result"), help="--batch output directory")
    p.add_argument("--batch-size", type=positive_int, default=8, help="--batch requests per forward pass and rank")
    p.add_argument("--host", default="127.0.0.1", help="web UI address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=7860)
    args = p.parse_args(argv)
    if args.batch is None and "--out" in (argv if argv is not None else sys.argv[1:]):
        p.error("--out only applies to --batch")
    return args


def load(args: argparse.Namespace, device: str):
    """Model (eval mode, on ``device`` unless a device map / quantisation places it) and tokenizer."""
    if not args.model.is_dir():
        hint = " (the bundled model: see docs/demo.md to rebuild it)" if args.model == DEFAULT_MODEL else ""
        raise ModelLoadError(f"{args.model}: model directory not found{hint}")
    return load_model_and_tokenizer(args.model, dtype=args.dtype or default_dtype(device), device_map=args.device_map,
                                    load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit, device=device)


def main(argv: list[str] | None = None) -> int:
    """Web UI or ``--batch``; bad input or a refused path is one line on stderr and exit status 2."""
    return run_cli("demo", _main, argv)


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes: one line per request is ours
    args = parse_args(argv)
    info = init_distributed()
    try:
        if args.batch is not None:
            return run_batch_mode(args, info.rank, info.world_size, info.device)
        if info.rank != 0:
            log.info("rank %d: the web UI is served by rank 0 only; nothing to do here", info.rank)
            return 0
        return run_web(args, info.device)
    finally:
        info.close()


def run_batch_mode(args: argparse.Namespace, rank: int, world: int, device: str) -> int:
    # before any work: not a file, not the batch file (nor a folder inside it)
    check_output_dir(args.out, inputs=[args.batch], must_be_empty=False, inputs_inside_ok=True, what="--out")
    items = read_batch_file(args.batch, rank, world)  # a bad line or image stops every rank alike
    stamp = time.strftime("%y%m%d%H%M%S")
    model, tokenizer = load(args, device)
    generator = Generator(model, tokenizer, GenerationSettings.from_args(args), batch_size=args.batch_size)
    stream = stream_path(args.out, stamp, rank)  # answers land here as they come (fsynced)
    local = run_batch(generator, items, rank, world, stream=stream)
    results = gather_results(local, world)
    if rank == 0:
        path = write_results(results, args.out, stamp)
        print(f"demo: {len(results)} answers -> {path} (streamed to {stream.name} as they came)")
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (torchrun, systemd, `kill`) stops the server like Ctrl-C: cleanup, no traceback


def run_web(args: argparse.Namespace, device: str) -> int:
    """Serve the web UI until Ctrl-C or SIGTERM; uploads go to a private folder removed at shutdown."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="medrega-demo-uploads-", ignore_cleanup_errors=True) as uploads:
            os.environ["GRADIO_TEMP_DIR"] = uploads  # gradio stores uploads there
            log.info("uploads go to %s (removed at shutdown)", uploads)
            return _serve(args, device)
    except KeyboardInterrupt:
        log.info("stopped")
        return 0


def _serve(args: argparse.Namespace, device: str) -> int:
    # imported here: gradio (a second or more to import) is needed by the web UI only, not by --batch
    from internvl.demo.app import DemoEngine, build_app, load_examples
    from internvl.demo.uploads import MAX_UPLOAD_BYTES

    model, tokenizer = load(args, device)
    engine = DemoEngine(model, tokenizer, GenerationSettings.from_args(args))
    app = build_app(engine, load_examples(DEFAULT_EXAMPLES), model_name=args.model.name)
    log.info("serving on http://%s:%d (model %s)", args.host, args.port, args.model)
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_BYTES, share=False,
               footer_links=[])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
