"""`alpaca run recipe.yaml`: run a recipe's stages in order into the run folder, skipping each stage whose config,
inputs and earlier stages are unchanged since its last success.

Each stage writes into RUN/.<stage>.partial and is renamed to RUN/<stage> only when it succeeds; manifest.json is
rewritten atomically after each stage. So Ctrl-C or kill -9 loses only the stage that was running, and a stage that
fails leaves the earlier ones as they were."""

import logging
import os
import shutil
import time
from datetime import datetime, timezone

from alpaca_trainml.cli import UsageError
from alpaca_trainml.loop import manifest, recipe, stages

logger = logging.getLogger(__name__)


class StageFailed(Exception):
    """A stage raised: the one line that names it (the cause keeps its traceback in __cause__)."""

    def __init__(self, stage, run_dir, error):
        self.stage = stage
        lines = str(error).strip().splitlines()
        what = f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__
        super().__init__(f"stage {stage} failed ({what}); the stages before it are kept in {run_dir}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: the one line that says which stage was lost."""

    def __init__(self, stage, run_dir):
        self.stage = stage
        super().__init__(f"interrupted during stage {stage}; the stages before it are kept in {run_dir}")


def set_determinism(threads):
    """Fix what changes the numbers between two runs on one CPU: the thread count (sums split differently) and the
    seed of Python's hash (set order). The stages seed torch, numpy and random themselves (Trainer's set_seed)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for the launchers' processes
            os.environ[name] = str(threads)
    os.environ.setdefault("PYTHONHASHSEED", "0")


def why_rerun(entry, fingerprint, config, previous, run_dir):
    """Why a stage must run ('' when it may be skipped)."""
    if entry is None:
        return "no earlier run"
    if entry.get("previous") != previous:
        return "an earlier stage changed"
    if entry["fingerprint"] != fingerprint:
        changed = sorted(k for k in set(config) | set(entry["config"]) if config.get(k) != entry["config"].get(k))
        return f"changed: {', '.join(changed)}" if changed else "its input files changed"
    if not manifest.outputs_intact(run_dir, entry):
        return "its outputs were changed or removed"
    return ""


def run_stage(ctx, stage, config):
    """Run one stage into RUN/.<stage>.partial, then rename it to RUN/<stage>. Returns the stage's metrics."""
    final, partial, old = (ctx.run_dir / name for name in (stage, f".{stage}.partial", f".{stage}.old"))
    if partial.exists() and stage != "generate":  # generate resumes its requests from the partial regen.json
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    metrics = stages.EXECUTE[stage](ctx, config, partial)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return metrics


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(path, run_dir=None, say=print, rerun=None):
    """Run the recipe at path; returns the manifest. A failing stage raises StageFailed (UsageError: the user's).
    rerun: a stage to run again even if unchanged (and so every stage after it)."""
    plan = recipe.load(path)
    if rerun is not None and rerun not in plan:
        present = ", ".join(s for s in recipe.STAGES if s in plan)
        raise UsageError(f"--rerun {rerun}: the recipe has no such stage; it has {present}")
    ctx = stages.Context(plan, recipe.run_dir(plan, path, run_dir), plan.get("seed", 42))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(plan.get("threads"))
    record = manifest.load(ctx.run_dir)
    record.update(recipe=str(path), recipe_sha256=manifest.sha256_file(path), versions=manifest.versions())
    previous, forced = None, False
    for stage in (s for s in recipe.STAGES if s in plan):
        real, inputs = stages.RESOLVE[stage](ctx)
        config = stages.shown(real, ctx)  # paths in the run folder as RUN_DIR/...: a moved folder still matches
        input_hashes = manifest.hash_inputs(inputs)
        fingerprint = manifest.fingerprint(stage, config, input_hashes, previous, plan.get("threads"))
        entry = record["stages"].get(stage)
        reason = why_rerun(entry, fingerprint, config, previous, ctx.run_dir)
        forced = forced or stage == rerun
        if forced and not reason:
            reason = "--rerun" if stage == rerun else "an earlier stage reran"
        if not reason:
            say(f"{stage}: unchanged since {entry['finished']}, skipped ({ctx.run_dir / stage})")
            previous = fingerprint
            continue
        say(f"{stage}: running ({reason})")
        started, t0 = now(), time.perf_counter()
        try:
            metrics = run_stage(ctx, stage, real)
        except UsageError as e:
            raise UsageError(f"stage {stage}: {e}") from e
        except KeyboardInterrupt:
            raise Interrupted(stage, ctx.run_dir) from None
        except Exception as e:  # a bug or a crash: the traceback is logged, the last line names the stage
            logger.exception("stage %s failed", stage)
            raise StageFailed(stage, ctx.run_dir, e) from e
        record["stages"][stage] = {
            "name": stage,
            "fingerprint": fingerprint,
            "previous": previous,
            "config": config,
            "seed": config.get("seed", ctx.seed),
            "inputs": input_hashes,
            "outputs": manifest.hash_files(ctx.run_dir / stage),
            "metrics": metrics,
            "versions": record["versions"],
            "device": manifest.device(),
            "environment": manifest.environment(),
            "started": started,
            "finished": now(),
            "wall_time_s": round(time.perf_counter() - t0, 1),
        }
        manifest.save(ctx.run_dir, record)
        say(f"{stage}: done in {record['stages'][stage]['wall_time_s']} s ({ctx.run_dir / stage})")
        previous = fingerprint
    for gone in [s for s in record["stages"] if s not in plan]:  # a stage taken out of the recipe
        del record["stages"][gone]
    manifest.save(ctx.run_dir, record)
    if plan.get("serve", True):
        say("serve the result:\n  " + "\n  ".join(stages.serve_commands(ctx)))
    return record
