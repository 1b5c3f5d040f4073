"""`make mutate`'s second part: mutations named by hand, each a promise of the README or docs/ that a
test once let through (a resume that forgets the weights, an export check that excuses moved boxes,
...). Each is applied to a scratch copy of the repository and the tests that hold the promise run there
in a fresh process. mutmut cannot check the resume: it forks each mutant's run from a process that has
started TensorFlow, and those runs only time out (docs/testing.md).

A mutant is caught when its tests fail (pytest's exit status 1). The same tests first run on an
unmutated copy and must pass there, so a test that fails anyway catches nothing. Exits 1 if a mutant is
not caught or the unmutated tests fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.repo_copy import make, make_repo_copy


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    before: str  # found exactly once in ``path``
    after: str
    tests: tuple[str, ...]  # pytest node ids that hold the promise

    @property
    def needs_demo(self) -> bool:
        return any(test.startswith(DEMO_TESTS) for test in self.tests)


DEMO_TESTS = ("tests/test_deploy.py", "tests/test_export.py")  # their fixtures read a `make demo` run

MUTANTS = (
    Mutant("resume restores fresh weights, only the step", "detkit/train/checkpoints.py",
           "    detector.load_weights(str(folder / WEIGHTS))\n",
           "    detector.optimizer.iterations.assign(step)\n",
           ("tests/test_checkpoints.py::test_restore_gives_back_every_weight_and_optimizer_slot_and_the_step",
            "tests/test_train.py::test_crashed_run_resumes_from_its_last_checkpoint")),
    Mutant("the export check has no bound on near ties", "detkit/serve/export_check.py",
           'return compared["mismatched"] == 0 and compared["near_tie_share"] <= MAX_NEAR_TIE_SHARE',
           'return compared["mismatched"] == 0',
           ("tests/test_export_check.py::test_every_box_moved_past_the_tolerance_fails_the_check",
            "tests/test_export_check.py::test_near_ties_beyond_their_share_fail_the_check",
            "tests/test_export_check.py::test_the_same_nms_with_every_box_moved_fails_the_check")),
    Mutant("a near tie needs no close score", "detkit/serve/export_check.py",
           "pair(close_scores & (overlap >= iou_threshold)", "pair(same_class & (overlap >= iou_threshold)",
           ("tests/test_export_check.py",)),
    Mutant("the weights digest reads one tensor", "detkit/train/distribute.py",
           "for v in model.trainable_weights]", "for v in model.trainable_weights[:1]]",
           ("tests/test_distribute.py::test_weights_digest_changes_with_any_trainable_weight_and_ignores_moving_statistics",)),
    Mutant("an endpoint update without its DeploymentConfig", "detkit/cloud/deploy.py",
           "EndpointConfigName=config,\n                                       DeploymentConfig=deployment_config)",
           "EndpointConfigName=config)",
           ("tests/test_deploy.py::test_update_is_blue_green_with_the_endpoints_alarms",)),
    Mutant("Ctrl-C does not stop the training job", "detkit/cloud/training_job.py",
           "        self.sagemaker.stop_training_job(TrainingJobName=name)\n", "        del name\n",
           ("tests/test_sagemaker_training.py::test_ctrl_c_while_waiting_stops_the_job_and_leaves_the_previous_model",)),
    Mutant("a re-run does not wait for the attempt still running", "detkit/cloud/training_job.py",
           '    if status in ("InProgress", "Stopping"):\n        return "wait"\n',
           '    if status in ("InProgress", "Stopping"):\n        return None\n',
           ("tests/test_sagemaker_training.py::test_a_rerun_waits_for_the_attempt_still_running_for_the_same_training",)),
    Mutant("the split sorted, not shuffled with its seed", "detkit/data/annotations.py",
           "random.Random(seed).shuffle(shuffled)", "shuffled.sort(key=str)",
           ("tests/test_annotations.py::test_the_split_is_the_pets_tools_for_its_seed_and_share",)),
    Mutant("the git revision is always unknown", "detkit/train/tracking.py",
           "check=True, timeout=10).stdout.strip()", 'check=True, timeout=10).stdout.strip() and "unknown"',
           ("tests/test_train.py::test_short_run_writes_log_checkpoints_model_and_mlflow_run",)),
    Mutant("a failed export check does not fail the stage", "stages/export.py",
           'if not check["passed"]:', "if False:",
           ("tests/test_export.py::test_a_failed_check_fails_the_stage_keeps_the_version_marked_failed_and_deploy_refuses_it",)),
)


def apply(root: Path, mutant: Mutant) -> None:
    path = root / mutant.path
    text = path.read_text()
    if text.count(mutant.before) != 1:
        raise SystemExit(f"harness/named_mutants.py: mutant '{mutant.name}': its code is not found exactly once in "
                         f"{mutant.path} ({text.count(mutant.before)} times); update the mutant to the code")
    path.write_text(text.replace(mutant.before, mutant.after))


def run_tests(root: Path, tests: tuple[str, ...], demo: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"DETKIT_TEST_DEMO_REPO": str(demo)} if demo else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                          cwd=root, env=env, capture_output=True, text=True)


def failed(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"^FAILED (\S+)", result.stdout, re.M)


def demo_run(scratch: Path) -> Path | None:
    """A finished `make demo` for the tests that read one: ``DETKIT_TEST_DEMO_REPO``'s, or one made here."""
    if not any(m.needs_demo for m in MUTANTS):
        return None
    if os.environ.get("DETKIT_TEST_DEMO_REPO"):
        return Path(os.environ["DETKIT_TEST_DEMO_REPO"])
    print("named mutants: make demo once, for the tests that read its run (minutes)", flush=True)
    root = make_repo_copy(scratch / "demo")
    made = make(root, "demo")
    if made.returncode:
        raise SystemExit(f"named mutants: make demo failed:\n{made.stdout[-3000:]}\n{made.stderr[-3000:]}")
    return root


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="named-mutants-") as scratch:
        scratch = Path(scratch).resolve()
        demo = demo_run(scratch)
        every_test = tuple(dict.fromkeys(test for m in MUTANTS for test in m.tests))
        unmutated = run_tests(make_repo_copy(scratch / "unmutated"), every_test, demo)
        if unmutated.returncode:
            print("named mutants: the tests fail without any mutant, so they catch nothing:\n"
                  f"{unmutated.stdout[-4000:]}")
            return 1
        let_through = []
        for number, mutant in enumerate(MUTANTS, 1):
            root = make_repo_copy(scratch / f"mutant-{number}")
            apply(root, mutant)
            result = run_tests(root, mutant.tests, demo)
            if result.returncode == 1:
                print(f"caught      {mutant.name} ({mutant.path}): {', '.join(failed(result))}", flush=True)
            else:
                let_through.append(mutant.name)
                print(f"NOT CAUGHT  {mutant.name} ({mutant.path}): pytest exit status {result.returncode}\n"
                      f"{result.stdout[-2000:]}", flush=True)
        print(f"named mutants: {len(MUTANTS) - len(let_through)} of {len(MUTANTS)} caught")
        return 1 if let_through else 0


if __name__ == "__main__":
    sys.exit(main())
