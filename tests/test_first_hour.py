"""A new user's first hour, run as README.md and docs/README.md write it.

From a fresh folder laid out like a clone (the repository's files linked in),
with relative paths and the default ``runs/demo``: ``make demo`` (made tiny by
the Makefile's DEMO_FLAGS, through the same target), then ``infer`` on a file,
``export``, ``--mode eval``, ``plot``, a relaunch that resumes, and
"training on your data": ``prepare`` of a manifest and a launch on what it
wrote. A last test reads the shell lines of the README's code blocks and checks
that each is one of the commands run here (the same program and flags; only
values differ), or is listed in NOT_RUN with the reason.
"""

import concurrent.futures
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import testenv

REPO = Path(__file__).resolve().parents[1]
LINKED = (
    "Makefile",
    "launch.py",
    "configs",
    "deepcoro_jax",
    "input_pipeline",
    "evaluators",
    "requirements.txt",
    ".venv",
)
DOCS = ("README.md", "docs/README.md")
# Config overrides that make the demo tiny (both of its steps read them).
DEMO_FLAGS = " ".join(
    (
        "--config.input.synthetic.num_studies=30",
        "--config.input.synthetic.num_frames='(16, 20)'",
        "--config.total_steps=4",
        "--config.optim.schedule.warmup_steps=1",
        # A constant rate: its step does not depend on total_steps, so `make demo` again
        # with more steps (and the run on "your data") loads the compiled step instead of
        # compiling it anew.
        "--config.optim.schedule.decay_type=constant",
        "--config.ckpt_steps=2",
        "--config.log_training_steps=2",
        "--config.input.batch_size=8",
        "--config.input.caption_max_len=48",
        "--config.input.text_max_len=48",
    )
)
# README commands not run here, with the reason.
NOT_RUN = {
    ("make", "test"): "the test suite itself",
    ("pip", "install"): "GPU and TPU wheels of JAX",
    ("tail",): "follows a growing file",
}
# Library chatter that must not reach the terminal.
CHATTER = re.compile(r"^(I|W)\d{4} |\bINFO\b|absl|oneDNN|deprecat|orbax|tensorflow", re.I | re.M)


def _shell(user, command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs `command` as typed, in the user's folder; records it."""
    cwd, env, ran = user
    ran.append(command)
    result = subprocess.run(
        command,
        shell=True,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        executable="/bin/bash",
    )
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A folder laid out like a fresh clone, its own HOME (so its own synthetic cache),
    and the list of commands run in it."""
    cwd = tmp_path_factory.mktemp("clone")
    for name in LINKED:
        (cwd / name).symlink_to(REPO / name)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(cwd / "home"),
        "JAX_PLATFORMS": "cpu",
        "LANG": "C.UTF-8",
        # Compile speed only (tests/testenv.py): fewer optimisations, and every
        # program kept in launch.py's cache, however fast it compiled.
        "XLA_FLAGS": testenv.FAST_COMPILE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": testenv.PROCESS_CACHE_MIN_SECS,
    }
    return cwd, env, []


@pytest.fixture(scope="module")
def demo(user):
    """`make demo`, tiny: its stdout, stderr and wall time."""
    return _shell(user, f'make demo DEMO_FLAGS="{DEMO_FLAGS}"')


def _source_video(user) -> Path:
    cwd = user[0]
    videos = sorted((cwd / "home" / ".cache" / "deepcoro_jax").glob("synthetic-*/source/**/*.mp4"))
    assert videos, "the demo generated no MP4"
    return videos[0]


@pytest.mark.slow
def test_make_demo_trains_evaluates_and_checkpoints_quietly(user, demo):
    run = user[0] / "runs" / "demo"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 4]
    for name in ("config.json", "metrics.jsonl", "log.txt", "contact_sheet.png"):
        assert (run / name).is_file(), name
    assert (run / "plots" / "training_curves.png").is_file()
    out = demo.stdout
    assert "step 4/4" in out and "eval val_retrieval @ step 4" in out, out
    assert "compiling the train step..." in out
    assert not CHATTER.search(out), CHATTER.search(out).group(0)
    assert not CHATTER.search(demo.stderr), demo.stderr[-3000:]
    # What the terminal no longer shows is in the log, with timestamps.
    log = (run / "log.txt").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", log, re.M)
    config = json.loads((run / "config.json").read_text())
    assert config["input"]["synthetic"]["cache_dir"] == str(user[0] / "home/.cache/deepcoro_jax")


def _infer_on_a_file(user) -> subprocess.CompletedProcess:
    video = user[0] / "path" / "to" / "video.mp4"
    video.parent.mkdir(parents=True)
    shutil.copy(_source_video(user), video)
    return _shell(
        user,
        ".venv/bin/python -m deepcoro_jax.tools.infer --workdir runs/demo --ground --attention "
        "runs/demo/attention path/to/video.mp4",
    )


def _export_eval_and_plot(user) -> dict[str, subprocess.CompletedProcess]:
    return {
        "export": _shell(
            user,
            ".venv/bin/python -m deepcoro_jax.tools.export --workdir runs/demo --split val "
            "--out runs/demo/val_embeddings.npz",
        ),
        "eval": _shell(
            user,
            ".venv/bin/python launch.py --config configs/multitask.py:runlocal --workdir "
            f"runs/demo --mode eval {DEMO_FLAGS}",
        ),
        "plot": _shell(user, ".venv/bin/python -m deepcoro_jax.tools.plot runs/demo"),
    }


def _train_on_your_data(user) -> subprocess.CompletedProcess:
    """The README's "Training on your data", with the demo's synthetic files copied into
    ./data as a user's own export (manifest paths relative to the manifest)."""
    source = _source_video(user).parents[1]
    while not (source / "manifest.csv").exists():
        source = source.parent
    shutil.copytree(source, user[0] / "data")
    _shell(
        user,
        ".venv/bin/python -m input_pipeline.prepare --manifest data/manifest.csv "
        "--out data/prepared --size 64 --workers 2 --label_columns left_significant "
        "--boxes data/boxes.jsonl",
    )
    # The README's flags; float32, the demo's shapes and schedule, and lesion boxes (the
    # location tasks): the demo's train step, loaded instead of compiled.
    flags = DEMO_FLAGS.replace("--config.total_steps=4", "--config.total_steps=1")
    return _shell(
        user,
        ".venv/bin/python launch.py --config configs/multitask.py:runlocal,data=data/prepared "
        f"--workdir runs/mine --config.model.dtype=float32 {flags} --config.evals='{{}}'",
    )


@pytest.fixture(scope="module")
def after_demo(user, demo):
    """The commands that only read the demo's run, in three chains side by side (both
    CPUs busy): infer on a file; export, --mode eval and plot; training on your data.
    Each test takes its chain's result (a failed command fails that test)."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        chains = {
            "infer": pool.submit(_infer_on_a_file, user),
            "export_eval_plot": pool.submit(_export_eval_and_plot, user),
            "your_data": pool.submit(_train_on_your_data, user),
        }
        concurrent.futures.wait(chains.values())
    return chains


@pytest.mark.slow
def test_infer_on_a_file_as_the_readme_writes_it(user, after_demo):
    result = after_demo["infer"].result()
    assert "path/to/video.mp4" in result.stdout and "checkpoint 4" in result.stdout
    assert "  where: " in result.stdout  # --ground: a box per lesion, or none to locate
    # A 4-step model may write an empty report (its first token EOS): then the maps are
    # skipped and the output says so (test_inference.py draws them from a trained run).
    if "attention maps: none (the generated report is empty)" not in result.stdout:
        assert list((user[0] / "runs/demo/attention").glob("000_video.png")), result.stdout
    assert not CHATTER.search(result.stdout + result.stderr), result.stderr[-2000:]


@pytest.mark.slow
def test_export_eval_and_plot_as_the_readme_writes_them(user, after_demo):
    results = after_demo["export_eval_plot"].result()
    arrays = np.load(user[0] / "runs/demo/val_embeddings.npz")
    norms = np.linalg.norm(arrays["video_emb"], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    evaluated = results["eval"]
    assert "eval val_captioning @ step 4" in evaluated.stdout, evaluated.stdout
    plotted = results["plot"]
    assert plotted.stdout.strip() == str(user[0] / "runs/demo/plots/training_curves.png")


@pytest.mark.slow
def test_training_on_your_data_with_relative_paths(user, after_demo):
    result = after_demo["your_data"].result()
    assert (user[0] / "data/prepared/prepare_report.json").is_file()
    assert "step 1/1" in result.stdout
    config = json.loads((user[0] / "runs/mine/config.json").read_text())
    assert config["input"]["data_dir"] == str(user[0] / "data/prepared")


@pytest.mark.slow
def test_make_demo_again_resumes(user, after_demo):
    flags = DEMO_FLAGS.replace("--config.total_steps=4", "--config.total_steps=6")
    result = _shell(user, f'make demo DEMO_FLAGS="{flags}"')
    steps = re.findall(r"^step (\d+)/6", result.stdout, re.M)
    assert steps and steps[0] == "6", result.stdout
    assert "eval val_retrieval @ step 0" not in result.stdout
    assert sorted(int(p.name) for p in (user[0] / "runs/demo/checkpoints").iterdir()) == [4, 6]


@pytest.mark.slow
def test_a_run_needs_no_data_to_load(user, after_demo):
    """The run keeps its tokenizers and its data's format: with the synthetic cache moved
    away, infer still writes reports (without a bank), and --mode eval reads the moved
    data (data=) with the run's own tokenizers."""
    cwd = user[0]
    cache = cwd / "home" / ".cache" / "deepcoro_jax"
    moved = cwd / "moved"
    shutil.move(cache, moved)
    try:
        result = _shell(
            user,
            ".venv/bin/python -m deepcoro_jax.tools.infer --workdir runs/demo path/to/video.mp4",
        )
        assert "report: " in result.stdout and "none (no report bank)" in result.stdout
        assert "warning: the run's training data" in result.stderr, result.stderr
        prepared = next(moved.glob("synthetic-*/prepared")).relative_to(cwd)
        evaluated = _shell(
            user,
            f".venv/bin/python launch.py --config configs/multitask.py:runlocal,data={prepared} "
            f"--workdir runs/demo --mode eval {DEMO_FLAGS}",
        )
        assert "eval val_retrieval @ step 6" in evaluated.stdout, evaluated.stdout
        # (launch.py's compilation cache is back under ~/.cache/deepcoro_jax; no data.)
        assert not list(cache.glob("synthetic-*")), "the synthetic set was generated again"
    finally:
        cache.mkdir(parents=True, exist_ok=True)
        for child in moved.iterdir():
            if not (cache / child.name).exists():
                shutil.move(child, cache / child.name)


# ------------------------------------------------------------- the README's commands


def readme_commands() -> list[str]:
    """The shell commands of the code blocks of DOCS, continuation lines joined and
    comments dropped."""
    commands = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for block in re.findall(r"^ *```(?:bash|sh|shell)\n(.*?)^ *```", text, re.M | re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    commands.append(line)
    return commands


def signature(command: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the program: make target, module or script; the set of flag names)."""
    words = shlex.split(command)
    words = [w for w in words if "=" not in w or w.startswith("-")]  # VAR=... of make
    program = Path(words[0]).name
    if program.startswith("python"):
        rest = words[1:]
        program_words = (rest[1],) if rest[0] == "-m" else (rest[0],)
        words = rest[2:] if rest[0] == "-m" else rest[1:]
    else:
        program_words = (program, *[w for w in words[1:2] if not w.startswith("-")])
        words = words[1 + len(program_words) - 1 :]
    flags = frozenset(w.split("=")[0] for w in words if w.startswith("--"))
    return program_words, flags


def test_the_signature_of_a_command():
    assert signature(
        ".venv/bin/python launch.py --config a.py:runlocal --workdir runs/demo --mode eval"
    ) == (("launch.py",), frozenset({"--config", "--workdir", "--mode"}))
    assert signature("python -m deepcoro_jax.tools.plot /runs/x") == (
        ("deepcoro_jax.tools.plot",),
        frozenset(),
    )
    assert signature('make demo DEMO_FLAGS="--config.total_steps=4"') == (
        ("make", "demo"),
        frozenset(),
    )


@pytest.mark.slow
def test_every_readme_command_was_run(user, demo):
    """Runs after the tests above (pytest keeps file order): each README command is one
    of the commands they ran, with the same flags (values may differ)."""
    ran = [signature(c) for c in user[2]]
    commands = readme_commands()
    assert len(commands) >= 8, commands
    for command in commands:
        program, flags = signature(command)
        if program in NOT_RUN or program[:1] in NOT_RUN:
            continue
        assert any(p == program and flags <= f for p, f in ran), (
            f"README command not run by the tests: {command}\nran: {user[2]}"
        )
