"""Deploy a tuned checkpoint as a trainML endpoint: POST /instruct runs inference.instruct on a GPU.

    pip install trainml && trainml configure        # once: the SDK and your API keys
    python deploy_endpoint.py --checkpoint alpaca
    python deploy_endpoint.py --checkpoint alpaca --gpu-count 1 --gpu-type rtx3090 --dry-run  # print, create nothing

It uploads inference.py and the alpaca_trainml package it imports (staged in a temp folder: not this whole checkout,
.venv and all) as the job's model, attaches the checkpoint (the endpoint sees it at $TRAINML_CHECKPOINT_PATH), waits
until the endpoint runs and prints its URL. Stop it when done:
    trainml job stop "Instruction-Trained LLM Endpoint Example"
"""

import asyncio
import json
import logging
import shutil
import tempfile
from pathlib import Path

from alpaca_trainml import cli

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
JOB_NAME = "Instruction-Trained LLM Endpoint Example"
ENDPOINT_FILES = ("inference.py", "alpaca_trainml")  # instruct() and the package it imports
# (name, type, optional): the fields instruct() takes, as the fork's route declared them
ROUTE_BODY = (
    ("instruction", "str", False),
    ("input", "str", True),
    ("max_tokens", "int", True),
    ("temperature", "float", True),
    ("top_p", "float", True),
    ("num_beams", "int", True),
)
# The endpoint's environment predates the transformers release inference.py is written for.
PIP_PACKAGES = ("transformers>=5.20,<6", "accelerate>=1.10,<2", "sentencepiece>=0.2,<0.3", "peft>=0.17,<0.22")
MAX_GPUS = 4


def endpoint_job_spec(
    checkpoint,
    model_dir,
    gpu_count=1,
    gpu_type="rtx3090",
    disk_size=10,
    environment="DEEPLEARNING_PY310",
    name=JOB_NAME,
):
    """Keyword arguments for TrainML().jobs.create: one route, /instruct -> inference.instruct.

    Raises cli.UsageError listing every bad argument."""
    problems = []
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        problems.append(f"--checkpoint must name a trainML checkpoint, got {checkpoint!r}")
    if not isinstance(gpu_count, int) or not 1 <= gpu_count <= MAX_GPUS:
        problems.append(f"--gpu-count must be 1 to {MAX_GPUS}, got {gpu_count!r}")
    if not isinstance(disk_size, int) or disk_size < 1:
        problems.append(f"--disk-size must be at least 1 (GB), got {disk_size!r}")
    if problems:
        raise cli.UsageError("; ".join(problems))
    body = [dict(name=n, type=t, optional=True) if opt else dict(name=n, type=t) for n, t, opt in ROUTE_BODY]
    route = dict(path="/instruct", verb="POST", file="inference", function="instruct", positional=False, body=body)
    return dict(
        name=name,
        type="endpoint",
        gpu_types=[gpu_type],
        gpu_count=gpu_count,
        disk_size=disk_size,
        model=dict(source_type="local", source_uri=str(model_dir), checkpoints=[dict(id=checkpoint.strip())]),
        environment=dict(type=environment, packages=dict(pip=list(PIP_PACKAGES))),
        endpoint=dict(routes=[route]),
    )


def stage_endpoint_files(dest, files=ENDPOINT_FILES):
    """Copy the files the endpoint imports into dest; return dest."""
    dest = Path(dest)
    for name in files:
        if (HERE / name).is_dir():
            shutil.copytree(HERE / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(HERE / name, dest / name)
    return dest


def trainml_sdk():
    """The SDK's TrainML class; without the SDK a cli.UsageError that says how to install it. Imported here, not at
    the top: --dry-run, the job spec and the tests need no SDK."""
    try:
        from trainml.trainml import TrainML
    except ImportError as e:
        raise cli.UsageError(f"the trainML SDK is not installed ({e}): pip install trainml && trainml configure") from e
    return TrainML


async def deploy(spec, timeout_s):
    """Create the endpoint job, upload the staged model folder, wait for it to run; return its URL."""
    job = await trainml_sdk()().jobs.create(**spec)
    print(f"created endpoint job {job.id}; uploading {spec['model']['source_uri']}")
    await job.wait_for("waiting for data/model download")
    await job.connect()  # a local model source uploads through this connection
    await job.wait_for("running", timeout_s)
    await job.refresh()
    return job.url


def main(args):
    if not args.dry_run:
        trainml_sdk()  # a missing SDK is said before anything is staged
    with tempfile.TemporaryDirectory(prefix="alpaca-endpoint-") as tmp:
        spec = endpoint_job_spec(
            args.checkpoint, stage_endpoint_files(tmp), args.gpu_count, args.gpu_type, args.disk_size, args.environment
        )
        if args.base_model:  # the endpoint has no command line: InstructModel reads it from there
            spec["environment"]["env"] = [dict(key="ALPACA_BASE_MODEL", value=args.base_model)]
        if args.dry_run:
            print(json.dumps(spec, indent=2))
            return None
        url = asyncio.run(deploy(spec, args.timeout))
    print(
        f"endpoint running: {url}\ntry it: curl -s {url}/instruct -H 'Content-Type: application/json' "
        '-d \'{"instruction": "Name three primary colours."}\''
    )
    return url


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="name or id of the trainML checkpoint to serve")
    # default 1, not the fork's 2: fp16 weights of a 7B model (13.5 GB) fit one 24 GB card; the fork loaded fp32
    p.add_argument("--gpu-count", dest="gpu_count", type=int, default=1, help=f"GPUs to attach (1 to {MAX_GPUS})")
    p.add_argument("--gpu-type", dest="gpu_type", default="rtx3090")
    p.add_argument("--disk-size", dest="disk_size", type=int, default=10, help="GB")
    p.add_argument(
        "--environment", default="DEEPLEARNING_PY310", help="trainML environment (transformers 5 needs Python 3.10+)"
    )
    p.add_argument("--base_model", default=None, help="base of a LoRA adapter checkpoint (default: its own record)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds to wait for the endpoint to run")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the job spec and stop")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.run("deploy_endpoint.py", main, parse_args())
