"""`make rehearsal`: the default run (``params.yaml`` selecting Oxford-IIIT Pet and the KerasHub
RetinaNet ResNet-50 FPN preset at 800 px), or the default run with another model file
(``--model dfine_small``, ``make rehearsal MODEL=dfine_small``), through every DVC stage, offline,
at full size per image, then served with `make serve`'s stack and sent the REST request of
docs/export.md.

It runs in a throwaway copy of the repository whose ``params.yaml`` and ``conf/`` are the
committed ones, with exactly two stand-ins, each fed through the path a user has:

- the dataset: ``benchmarks.pets_like`` archives (real per-image scale, every quirk of the
  real archives), named in ``conf/dataset/oxford_pets.yaml`` of the copy by ``file://`` URL
  with their size and sha256, as a user edits that group file for a mirror;
- the pretrained preset: ``benchmarks.standin_preset`` (the exact architecture of the KerasHub
  preset that the model file's ``pretrained`` names, e.g. ``retinanet_resnet50_fpn_coco``, with
  random weights, as a ``.tar.gz``; its builder is chosen by the preset's name), given with
  ``dvc exp run -S 'conf/model/<model>.yaml:pretrained=...'`` and its sha256. A model file
  with ``pretrained: none`` needs no stand-in.

The model file is selected as a user selects one for an experiment, ``-S model=<model>``. Only
``train.steps`` and ``train.batch_size`` are reduced (``-S``), and ``train.warmup_steps`` with
them (the config requires it below ``train.steps``; it is set to ``steps - 1``, the longest
warmup allowed). Each stage runs as its own ``dvc exp run -s <stage>`` under
``benchmarks.peak_rss``, which measures its memory and kills it above ``--limit-gb``.

Printed: every stage's own summary lines, then a table of wall time and peak memory per
stage (goal: every stage < 8 GB), seconds per train step, the first steps' losses, the
served request's latency, and the total wall time.

    python -m benchmarks.rehearsal [--model retinanet_resnet50] [--steps 4] [--batch-size 2]
                                   [-S eval.batch_size=2 ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from omegaconf import OmegaConf

from benchmarks import peak_rss, pets_like, standin_preset
from harness.repo_copy import REPO_ROOT, activated_env, make_repo_copy

STAGES = ("download", "tfrecord", "pretrained", "train", "eval", "export", "package")
DEFAULTS = {"dataset": "oxford_pets", "model": "retinanet_resnet50"}
DATASET_FILE = f"conf/dataset/{DEFAULTS['dataset']}.yaml"
GOAL_GB = 8.0
BIN = Path(sys.executable).parent  # the venv's bin: `dvc`, and the `python` of the stage commands
# The train stage's progress bar: "train:  50%|###  | 2/4 [00:21<00:21, ...]".
BAR = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<")


class RehearsalError(RuntimeError):
    pass


def measured(cmd: list[str], cwd: Path, env: dict[str, str], logs: Path, name: str, limit_gb: float) -> dict:
    """Run ``cmd`` in ``cwd`` under ``benchmarks.peak_rss`` (a fresh process, so its figures are this
    command's alone; ``cwd`` is a checkout of this repository, the copy's own code for the stages)."""
    figures = logs / f"{name}.json"
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        subprocess.run([sys.executable, "-m", "benchmarks.peak_rss", "--json", str(figures), "--limit-gb",
                        str(limit_gb), "--", *cmd], cwd=cwd, env=env, stdout=out, stderr=err)
    result = json.loads(figures.read_text())
    result["stdout"], result["stderr"] = (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text()
    return result


def own_lines(stage: str, stdout: str) -> list[str]:
    """The stage's own summary lines (``<stage>: ...`` and their indented details), not DVC's."""
    lines, inside = [], False
    for line in stdout.splitlines():
        inside = line.startswith(f"{stage}:") or (inside and line.startswith("  "))
        if inside:
            lines.append(line)
    return lines


def failure(name: str, result: dict) -> str:
    tail = "\n".join((result["stdout"] + result["stderr"]).splitlines()[-40:])
    why = result["killed"] or f"exit status {result['returncode']}"
    return f"{name} failed ({why}); its last output:\n{tail}"


def edit_dataset_file(repo: Path, archives: dict[str, dict]) -> None:
    """Point the dataset's archives at the stand-in files, as a user adds a mirror to the group file."""
    path = repo / DATASET_FILE
    conf = OmegaConf.load(path)
    for archive in conf.archives:
        got = archives[archive.name]
        archive.urls, archive.size, archive.sha256 = [got["path"].resolve().as_uri()], got["size"], got["sha256"]
    OmegaConf.save(conf, path)


def default_run_copy(dest: Path, source: Path = REPO_ROOT) -> Path:
    """A copy of ``source``'s working tree (its code as it stands) whose ``params.yaml`` and ``conf/`` are
    the committed ones: the rehearsal is of the default run whatever the workspace holds (``make demo``
    leaves its own values in ``params.yaml``)."""
    repo = make_repo_copy(dest, source)
    committed = subprocess.run(["git", "archive", "HEAD", "params.yaml", "conf"], cwd=source, check=True,
                               capture_output=True).stdout
    shutil.rmtree(repo / "conf")
    with tarfile.open(fileobj=io.BytesIO(committed)) as archive:
        archive.extractall(repo, filter="data")
    env = activated_env()
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "the committed config"], cwd=repo, check=True,
                   env=env)
    return repo


def check_defaults(repo: Path) -> None:
    params = OmegaConf.load(repo / "params.yaml")
    wrong = {key: params.get(key) for key, value in DEFAULTS.items() if params.get(key) != value}
    if wrong:
        raise RehearsalError(f"the committed params.yaml selects {wrong}, not the default run {DEFAULTS}")


def model_file(model: str) -> str:
    return f"conf/model/{model}.yaml"


def model_preset(repo: Path, model: str) -> str | None:
    """The KerasHub preset that the copy's (committed) model file starts from, None for ``pretrained:
    none``; RehearsalError when there is no such model file or no stand-in for its preset."""
    path = repo / model_file(model)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (repo / "conf" / "model").glob("*.yaml")))
        raise RehearsalError(f"--model {model}: no committed {model_file(model)} (model files: {known})")
    source = str(OmegaConf.load(path).pretrained)
    if source == "none":
        return None
    preset = standin_preset.preset_name(source)
    try:
        standin_preset.builder(preset)
    except standin_preset.StandInError as exc:
        raise RehearsalError(f"{model_file(model)}: pretrained {source}: {exc}") from exc
    return preset


def run_overrides(model: str, steps: int, batch_size: int, preset: dict | None, extra: list[str]) -> list[str]:
    """The ``dvc exp run -S`` overrides of every stage: the model file, the reduced training, the stand-in."""
    overrides = [f"model={model}", f"train.steps={steps}", f"train.batch_size={batch_size}",
                 f"train.warmup_steps={steps - 1}"]
    if preset is not None:
        overrides += [f"{model_file(model)}:pretrained='{Path(preset['archive']).resolve().as_uri()}'",
                      f"{model_file(model)}:pretrained_sha256='{preset['sha256']}'"]
    return overrides + list(extra)


def effective_config(repo: Path) -> str:
    """The composed config the stages read in the copy, for the keys this rehearsal is about."""
    from detkit.config import load_config

    with mock.patch.dict(os.environ, DVC_ROOT=str(repo)):
        cfg = load_config()
    m, t = cfg.model, cfg.train
    return (f"dataset {cfg.dataset.name} ({len(cfg.dataset.archives)} archives by file:// URL), model {m.name} "
            f"(family {m.family}, {m.image_size} px, pretrained {Path(m.pretrained).name}); train.steps {t.steps}, "
            f"batch_size {t.batch_size}, warmup_steps {t.warmup_steps}, learning_rate {t.learning_rate}; "
            f"eval.batch_size {cfg.eval.batch_size}; export.check_images {cfg.export.check_images}")


def seconds_per_step(stderr: str, summary: list[str]) -> tuple[float | None, float | None]:
    """(steady s/step from the progress bar's elapsed times after step 1, overall s/step of the summary line)."""
    elapsed = {}
    for frame in re.split(r"[\r\n]", stderr):
        if match := BAR.search(frame):
            step, hours, minutes, secs = match.groups()
            # A step's first frame: the bar is drawn again at the end, after the final model is saved.
            elapsed.setdefault(int(step), int(hours or 0) * 3600 + int(minutes) * 60 + int(secs))
    steady = None
    if 1 in elapsed and max(elapsed) > 1:
        steady = (elapsed[max(elapsed)] - elapsed[1]) / (max(elapsed) - 1)
    overall = None
    for line in summary:
        if match := re.match(r"train: (\d+) steps \(from (\d+)\) in ([\d.]+) s", line):
            steps, start, seconds = match.groups()
            overall = float(seconds) / max(int(steps) - int(start), 1)
    return steady, overall


def first_losses(log: Path, count: int = 3) -> list[dict[str, float]]:
    with open(log) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)][:count]


def val_image(repo: Path) -> tuple[str, bytes]:
    """A plain JPEG of the val split, as the tfrecord stage split the rows."""
    from detkit.data.annotations import list_pets, split_rows

    raw = repo / "data" / "raw"
    split = OmegaConf.load(repo / "params.yaml").split
    _, val = split_rows(list_pets(raw)[0], split.train_fraction, split.seed)
    quirks = set(pets_like.quirk_images())
    stem = next(stem for stem, _ in val if stem not in quirks)
    return stem, (raw / "images" / f"{stem}.jpg").read_bytes()


@contextmanager
def sampled_rss(pid: int, interval: float = 0.2):
    """Yield a dict whose ``peak`` is the largest resident sum of ``pid``'s tree seen so far."""
    from harness.serving import descendants

    seen = {"peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                seen["peak"] = max(seen["peak"], sum(peak_rss.rss_bytes(p) for p in [pid, *descendants(pid)]))
            except OSError:  # a process ended while it was read
                pass
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def serve_and_request(repo: Path, requests_after_first: int = 3) -> dict:
    """`make serve`'s stack on the copy's export; the REST request of docs/export.md with one val image."""
    import requests

    from detkit.serve.predict import parse_response, request_body
    from harness.serving import ServingStack

    export_base = repo / "models" / "export"
    model_name = next(p.name for p in sorted(export_base.iterdir()) if p.is_dir())
    stem, image = val_image(repo)
    body = request_body([image])
    stack = ServingStack(export_base, model_name=model_name)
    started = time.perf_counter()
    stack.start()
    try:
        with sampled_rss(stack.process.pid) as rss:
            stack.wait_ready(timeout_s=600)
            ready_s = time.perf_counter() - started
            latencies, prediction = [], None
            for _ in range(1 + requests_after_first):
                sent = time.perf_counter()
                response = requests.post(stack.invocations_url, data=body,
                                         headers={"content-type": "application/json"}, timeout=300)
                latencies.append(time.perf_counter() - sent)
                prediction = parse_response(stack.invocations_url, response.status_code, response.content)
    finally:
        stack.stop()
    top = prediction["predictions"][0]
    return {"model": model_name, "image": stem, "image_bytes": len(image), "ready_s": ready_s,
            "first_s": latencies[0], "warm_s": statistics.median(latencies[1:]) if latencies[1:] else None,
            "detections": int(top["num_detections"]), "peak_gb": rss["peak"] / 1e9}


def rehearse(work: Path, args: argparse.Namespace, report: dict) -> None:
    """Run everything in ``work``, filling ``report`` as it goes; RehearsalError on a failure."""
    results = report["results"]
    logs = work / "logs"
    logs.mkdir(parents=True)

    repo = default_run_copy(work / "repo")
    check_defaults(repo)
    name = model_preset(repo, args.model)
    archives = pets_like.write_archives(work / "archives", args.per_breed, args.test_per_breed)
    print(pets_like.describe(archives))
    edit_dataset_file(repo, archives)
    preset = None
    if name is not None:
        result = results["stand-in preset"] = measured(
            [sys.executable, "-m", "benchmarks.standin_preset", "--preset", name, "--out", str(work / "preset")],
            REPO_ROOT, dict(os.environ), logs, "standin_preset", args.limit_gb)
        if result["returncode"] != 0:
            raise RehearsalError(failure("the stand-in preset", result))
        print(result["stdout"].strip())
        preset = json.loads((work / "preset" / "info.json").read_text())
    overrides = run_overrides(args.model, args.steps, args.batch_size, preset, args.set)
    report["overrides"] = overrides
    print(f"copy: {repo}; {DATASET_FILE} edited to the stand-in archives; each stage: "
          f"dvc exp run {' '.join(f'-S {o}' for o in overrides)} -s <stage>")

    env = activated_env()  # `dvc` and the stage commands' `python` are the venv's, as under make
    for stage in STAGES:
        cmd = [str(BIN / "dvc"), "exp", "run", *(arg for o in overrides for arg in ("-S", o)), "-s", stage]
        result = results[stage] = measured(cmd, repo, env, logs, stage, args.limit_gb)
        for line in own_lines(stage, result["stdout"]):
            print(line)
        if result["returncode"] != 0:
            raise RehearsalError(failure(f"stage {stage}", result))
        if stage == "download":
            print(f"config the stages read: {effective_config(repo)}")
        if stage == "pretrained" and preset is not None:
            loaded = json.loads((repo / "models" / "pretrained" / "source.json").read_text())
            if loaded.get("parameters") != preset["parameters"]:
                raise RehearsalError(f"the pretrained stage loaded {loaded.get('parameters')} parameters, "
                                     f"the stand-in has {preset['parameters']}")
    report["steps"] = seconds_per_step(results["train"]["stderr"], own_lines("train", results["train"]["stdout"]))
    report["losses"] = first_losses(repo / "plots" / "train_log.csv")
    report["serving"] = serving = serve_and_request(repo)
    results["serve"] = {"seconds": serving["ready_s"], "peak_tree_gb": serving["peak_gb"], "max_rss_gb": None,
                        "killed": None}


def print_summary(report: dict, args: argparse.Namespace, total_s: float, error: str | None) -> bool:
    """The summary table; True when the run completed and every stage stayed under the goal."""
    results = report["results"]
    print()
    model = "" if args.model == DEFAULTS["model"] else f" with model={args.model}"
    print(f"rehearsal of the default run{model}: train.steps={args.steps}, train.batch_size={args.batch_size}, "
          f"train.warmup_steps={args.steps - 1}" + (f"; NOT the defaults: {' '.join(args.set)}" if args.set else
                                                     "; everything else as `dvc repro`"))
    print(f"{'':<16} {'wall s':>8} {'largest process GB':>19} {'all processes GB':>17}  note")
    over = []
    for name, r in results.items():
        largest = f"{r['max_rss_gb']:.2f}" if r.get("max_rss_gb") is not None else "-"
        peak = max(r.get("max_rss_gb") or 0, r["peak_tree_gb"])
        note = f"KILLED: {r['killed']}" if r.get("killed") else ""
        if name in STAGES and peak >= GOAL_GB:
            over.append(f"{name} {peak:.1f} GB")
            note = (note + "  OVER 8 GB").strip()
        if name == "serve":
            note = note or "stack up (s), then sampled while serving"
        if name == "stand-in preset":
            note = note or "builds the stand-in; not a pipeline stage"
        print(f"{name:<16} {r['seconds']:>8.1f} {largest:>19} {r['peak_tree_gb']:>17.2f}  {note}")
    steady, overall = report.get("steps", (None, None))
    if overall is not None:
        after_first = f"{steady:.1f} s/step after the first step (progress bar), " if steady is not None else ""
        print(f"train: {after_first}{overall:.1f} s/step overall (the stage's summary line: with the first step's "
              "tracing and the final model's save)")
    for row in report.get("losses", []):
        print(f"  step {int(row['step'])}: loss {row['loss']:.4g}  box_loss {row['box_loss']:.4g}  "
              f"class_loss {row['class_loss']:.4g}  learning_rate {row['learning_rate']:.3g}")
    for stage in ("eval", "export"):
        if stage in results:
            print(f"{stage}: {results[stage]['seconds']:.1f} s wall (dvc exp run -s {stage})")
    if "serving" in report:
        s = report["serving"]
        warm = f", then median {s['warm_s'] * 1000:.0f} ms over the next 3" if s["warm_s"] is not None else ""
        print(f"served: {s['model']} via nginx /invocations (`make serve`'s stack), docs/export.md's request with "
              f"val image {s['image']}.jpg ({s['image_bytes'] // 1024} KB): first request {s['first_s'] * 1000:.0f} ms"
              f"{warm}; {s['detections']} detections")
    ran = [name for name in results if name in STAGES]
    if over:
        print(f"goal: every stage < {GOAL_GB:g} GB: NOT met ({', '.join(over)})")
    elif ran:
        print(f"goal: every stage < {GOAL_GB:g} GB: met by the {len(ran)} stages that ran")
    print(f"total wall time: {total_s:.0f} s" + (f"; FAILED: {error}" if error else ""))
    return error is None and not over


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULTS["model"],
                        help=f"the model file conf/model/<MODEL>.yaml (-S model=<MODEL>; default {DEFAULTS['model']})")
    parser.add_argument("--steps", type=int, default=4, help="train.steps (at least 2)")
    parser.add_argument("--batch-size", type=int, default=2, help="train.batch_size (2 fits at 800 px on 24 GB)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more `dvc exp run -S` overrides, for development only (the run is then not the default)")
    parser.add_argument("--per-breed", type=int, default=8, help="stand-in trainval images per breed")
    parser.add_argument("--test-per-breed", type=int, default=2, help="stand-in test images per breed")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="kill a stage whose processes pass this")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep everything (copy, archives, logs) in this new folder instead of a temporary one")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (seconds per step are measured after the first)")
    if args.work and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work}: not empty; give a new folder")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
        work = args.work or Path(tmp)
        report: dict = {"results": {}}
        error = None
        try:
            rehearse(work, args, report)
        except RehearsalError as exc:
            error = str(exc)
            print(error, file=sys.stderr)
        ok = print_summary(report, args, time.perf_counter() - started, error.splitlines()[0] if error else None)
        if args.work:
            print(f"kept: {work} (logs/ holds each stage's output)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
