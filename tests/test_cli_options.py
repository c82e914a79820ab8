"""The click command line: one-line usage errors, options that cannot drift from the settings
dataclasses, --config files, library parameter names turned into flags, shell completion."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import click
import numpy as np
import pytest

from graphprune.cli_options import fills_table, flag_names, flags_for, translate
from graphprune.commands import optimize as optimize_command
from graphprune.commands import profile as profile_command
from graphprune.errors import GraphpruneError
from graphprune.passes import PassState
from graphprune.optimize import OptimizeResult
from onnx_builders import residual_onnx, save

OPTIMIZE = optimize_command.command
REQUIRED = ["--latency-cut", "0.2", "-o", "out.onnx"]
NORMALISE = ["--mean", "0.5", "--std", "0.25"]  # the test model has 4 channels


def _one_line(result, expected: str, exit_code: int):
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("graphprune: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("argv, expected", [
    (("optimize", "m.onnx", "-o", "o.onnx"), "the following arguments are required: --latency-cut"),
    (("optimize", "m.onnx", *REQUIRED, "--backend", "tvm"), "argument --backend: 'tvm' is not one of"),
    (("optimize", "m.onnx", *REQUIRED, "--seed", "x"),
     "argument --seed: must be an integer from 0 to 2**32 - 1, got 'x'"),
    (("optimize", "m.onnx", "--latency-cut", "1.5", "-o", "o.onnx"),
     "argument --latency-cut: must be between 0 and 1 (exclusive), got '1.5'"),
    (("optimize", "m.onnx", *REQUIRED, "--recovery-batch-size", "0"), "--recovery-batch-size: must be a positive"),
    (("optimize", "m.onnx", *REQUIRED, "--refine-evaluations", "-1"), "--refine-evaluations: must be 0 or more"),
    (("optimize", "m.onnx", *REQUIRED, "--data", "/no/such/folder"), "argument --data: Path '/no/such/folder'"),
    (("optimize", "m.onnx", *REQUIRED, "--mean", "a,b"), "--mean: must be comma-separated numbers, got 'a,b'"),
    (("optimize", "m.onnx", *REQUIRED, "--frobnicate"), "No such option '--frobnicate'"),
    (("optimize",), "the following arguments are required: MODEL"),
    (("optimise",), "argument COMMAND: invalid choice: 'optimise'"),
    (("--frobnicate",), "No such option '--frobnicate'"),
    (("profile", "m.onnx", "--min-runs", "1000000000000"),  # was the library's 'need 1 <= min_runs <= max_runs'
     "argument --min-runs: must be an integer from 1 to 100000, got '1000000000000'"),
    (("optimize", "m.onnx", *REQUIRED, "--passes", ","), "argument --passes: must name one or more passes, got ','"),
])
def test_click_usage_errors_are_one_line_and_exit_2(cli, argv, expected):
    _one_line(cli(*argv), expected, 2)


def test_no_command_prints_help_and_exits_2(cli):
    code, out, err = cli()
    assert code == 2 and "Commands:" in out and "optimize" in out


def test_help_shows_groups_in_order_with_defaults(cli):
    code, out, err = cli("optimize", "--help")
    titles = ["Model and input:", "Data:", "Latency target:", "Scoring:", "Refinement:", "Recovery:", "Output:"]
    assert code == 0 and all(t in out for t in titles), out
    assert [out.index(t) for t in titles] == sorted(out.index(t) for t in titles)
    recovery = out[out.index("Recovery:"):out.index("Output:")]
    assert "--recovery-lr" in recovery and "[default: 0.0003" in recovery and "--score-lr" not in recovery


# ---- the options cannot drift from the dataclasses ---------------------------------------------

def _field_paths(cls, prefix: str = "") -> set[str]:
    """Every leaf field of a settings dataclass, nested dataclass fields walked into."""
    paths = set()
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            paths |= _field_paths(type(default), f"{prefix}{field.name}.")
        else:
            paths.add(prefix + field.name)
    return paths


def test_every_settings_field_is_an_option_or_listed_internal():
    settings = optimize_command.SETTINGS
    filled = {path for paths in fills_table(OPTIMIZE.params).values() for path in paths}
    every = set()
    for root, cls in settings.roots.items():
        every |= _field_paths(cls, f"{root}." if root else "")
    internal, derived = set(optimize_command.INTERNAL), set(optimize_command.DERIVED)
    assert filled <= every, filled - every  # an option naming a field that does not exist
    assert not filled & internal and not filled & derived and not internal & derived
    assert every == filled | internal | derived, every - (filled | internal | derived)
    assert fills_table(OPTIMIZE.params)["--score-iterations"] == ("recoverability.iterations",)


def _defaults(command) -> dict:
    ctx = click.Context(command)
    return {p.name: p.get_default(ctx) for p in command.params}


def test_every_option_default_is_the_dataclass_default():
    settings, defaults = optimize_command.SETTINGS, _defaults(OPTIMIZE)
    checked = 0
    for param in OPTIMIZE.params:
        for path in getattr(param, "fills", ()):
            if param.required or defaults[param.name] is None:  # required, or not given: the field's default holds
                continue
            assert param.to_field(defaults[param.name]) == settings.default(path), (param.opts, path)
            checked += 1
    assert checked >= 25
    profile = _defaults(profile_command.command)
    assert profile["min_runs"] == profile_command.SETTINGS.default("min_runs")
    assert profile["min_time"] == 2 * optimize_command.SETTINGS.default("latency.min_time_s")


def test_defaults_build_the_default_config():
    params = OPTIMIZE.params
    args = SimpleNamespace(**_defaults(OPTIMIZE))
    args.latency_cut = 0.3
    config = optimize_command.SETTINGS.build(params, args)
    assert config == dataclasses.replace(type(config)(), latency_cut=0.3)
    args.seed, args.recovery_lr, args.quiet = 7, 0.01, True
    config = optimize_command.SETTINGS.build(params, args)
    assert (config.seed, config.recoverability.seed, config.recovery.seed) == (7, 7, 7)
    assert config.recovery.lr == 0.01 and config.show_progress is False
    assert optimize_command.SETTINGS.build(params, args, "synthesis").seed == 7


# ---- --config --------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_inputs(tmp_path):
    model = save(residual_onnx(), tmp_path / "m.onnx")
    data = tmp_path / "tiny.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (20, 16, 16, 4), dtype=np.uint8))
    return model, data


@pytest.fixture()
def captured(monkeypatch):
    """optimize's command up to the pipeline: the config it would run, the pipeline itself skipped."""
    seen = {}

    def fake_optimize(model, tiny, config, pipeline=None):
        seen.update(config=config, tiny=tiny)
        return OptimizeResult(model, PassState(model), {"data": {}, "settings": config.to_dict()})
    monkeypatch.setattr(optimize_command, "optimize", fake_optimize)
    monkeypatch.setattr(optimize_command, "format_summary", lambda report: "summary")
    return seen


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_round_trip_and_flags_override(cli, tiny_inputs, tmp_path, captured, suffix):
    model, data = tiny_inputs
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    if suffix == ".toml":
        text = (f'latency-cut = 0.3\ndata = "{data}"\noutput = "{out}"\nno-cache = true\nquiet = true\n'
                'mean = [0.5, 0.5, 0.5, 0.5]\nstd = 0.25\n[scoring]\nscore-iterations = 7\n[recovery]\nrecovery-lr = 0.01\n'
                'augment = "none"\n')
    else:
        text = (f"latency-cut: 0.3\ndata: {data}\noutput: {out}\nno-cache: true\nquiet: true\n"
                "mean: [0.5, 0.5, 0.5, 0.5]\nstd: 0.25\nscoring:\n  score-iterations: 7\nrecovery:\n  recovery-lr: 0.01\n"
                "  augment: none\n")
    config_path = tmp_path / f"run{suffix}"
    config_path.write_text(text)
    code, stdout, err = cli("optimize", model, "--config", config_path, "--recovery-lr", "0.02", "--report", report)
    assert code == 0, err
    config = captured["config"]
    assert config.latency_cut == 0.3 and config.recoverability.iterations == 7 and config.recovery.augment == "none"
    assert config.recovery.lr == 0.02  # the flag wins over the file
    assert config.cache_dir is None and config.show_progress is False and out.exists()
    assert captured["tiny"].source == str(data) and len(captured["tiny"]) == 20
    doc = json.loads(report.read_text())
    assert doc["config_file"]["path"] == str(config_path)
    assert set(doc["config_file"]["keys"]) == {"latency-cut", "data", "output", "no-cache", "quiet", "mean", "std",
                                               "score-iterations", "recovery-lr", "augment"}
    assert doc["settings"]["recovery"]["lr"] == 0.02


def test_no_config_file_is_recorded_as_none(cli, tiny_inputs, tmp_path, captured):
    model, data = tiny_inputs
    report = tmp_path / "r.json"
    code, _, err = cli("optimize", model, *REQUIRED[:2], "-o", tmp_path / "o.onnx", "--data", data, "--no-cache",
                       *NORMALISE, "--report", report)
    assert code == 0, err
    assert json.loads(report.read_text())["config_file"] is None


@pytest.mark.parametrize("text, expected", [
    ("latency-cut = 0.2\nfrobnicate = 1\n", "unknown key 'frobnicate'"),
    ("[recovery]\nlatency-cut = 0.2\n", "unknown key 'recovery.latency-cut'"),
    ("recovery-lr = 0.1\n[recovery]\nrecovery-lr = 0.2\n", "key 'recovery-lr' is given twice"),
    ("latency-cut = 1.5\n", "--config key 'latency-cut': must be between 0 and 1"),
    ("latency-cut = \n", "run.toml"),  # malformed TOML
    # read as the command line reads them: click's int type truncated these floats without a word
    ("latency-cut = 0.2\nseed = 1.5\n", "--config key 'seed': must be an integer from 0 to 2**32 - 1, got '1.5'"),
    ("latency-cut = 0.2\ninput-shape = [1, 3, 32.7, 32]\n",
     "--config key 'input-shape': must be comma-separated integers, got '1,3,32.7,32'"),
    ("latency-cut = 0.2\ninput-shape = [true, 3, 32, 32]\n",
     "'input-shape' must be a list of integers, got list [True, 3, 32, 32]"),
    ("latency-cut = 0.2\nmean = []\n", "--config key 'mean': must be comma-separated numbers, got ''"),  # said
    # 'positive integers'
])
def test_config_file_errors_are_one_line(cli, tmp_path, text, expected):
    (tmp_path / "run.toml").write_text(text)
    _one_line(cli("optimize", "m.onnx", "-o", "o.onnx", "--config", tmp_path / "run.toml"), expected, 2)


# ---- library parameter names -> flags ------------------------------------------------------------

@pytest.mark.parametrize("message, parameter, expected", [
    ("latency_cut must be between 0 and 1 (exclusive), got 1.5", "latency_cut",
     "--latency-cut must be between 0 and 1 (exclusive), got 1.5"),
    ("recovery.lr must be positive; lower recovery.lr", "recovery.lr",
     "--recovery-lr must be positive; lower --recovery-lr"),
    ("recoverability.iterations must be at least 0", "recoverability.iterations", "--score-iterations must be"),
    ("min_time_s must not be negative", "min_time_s", "--min-time must not be negative"),  # the one path it ends
    ("or use batch_size 1)", "batch_size", "or use --batch-size 1)"),  # not --recovery-batch-size
    ("mean has 2 values", "mean", "--mean has 2 values"),
    ("holdout_minimum too large", "holdout_minimum", "holdout_minimum too large"),  # no flag: unchanged
    ("seeds and seed_x: seed", "seed", "seeds and seed_x: --seed"),  # whole names only
])
def test_library_parameters_become_flags(message, parameter, expected):
    exc = translate(GraphpruneError(message, parameter=parameter), flag_names(OPTIMIZE.params))
    assert str(exc).startswith(expected) and exc.parameter == parameter


def test_one_library_parameter_several_flags():
    with pytest.raises(GraphpruneError, match="^--eval-data must be a folder"):
        with flags_for(path="--eval-data"):
            raise GraphpruneError("path must be a folder of images or an .npz file, got x.txt", parameter="path")


def test_library_messages_read_as_flags_from_the_command_line(cli, tiny_inputs, tmp_path):
    model, data = tiny_inputs
    argv = ["optimize", model, "--data", data, *REQUIRED[:2], "-o", tmp_path / "o.onnx", "--no-cache", *NORMALISE]
    _one_line(cli(*argv, "--mean", "0.5,0.5"), "--mean has 2 values; the model takes 4 channels", 1)
    _one_line(cli(*argv, "--input-shape", "1,4,16"), "--input-shape 1,4,16 has 3 dimensions", 1)
    (tmp_path / "images.txt").write_text("not images")
    argv[3] = tmp_path / "images.txt"
    _one_line(cli(*argv), "--data must be a folder of images, a labels .csv or an .npz file", 1)


# ---- shell completion ----------------------------------------------------------------------------

def test_shell_completion(monkeypatch, capsys):
    from graphprune.cli import main

    monkeypatch.setenv("_GRAPHPRUNE_COMPLETE", "bash_source")
    with pytest.raises(SystemExit):
        main([])
    assert "_graphprune_completion" in capsys.readouterr().out
    monkeypatch.setenv("_GRAPHPRUNE_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", "graphprune optimize m.onnx --recovery-l")
    monkeypatch.setenv("COMP_CWORD", "3")
    with pytest.raises(SystemExit):
        main([])
    assert "--recovery-lr" in capsys.readouterr().out


def test_the_output_format_reaches_the_config(cli, tiny_inputs, tmp_path, captured):
    """-o's suffix is the config's output_format, which quantize 'auto' reads (an int8 model is ONNX
    only: test_plan_quantization.py leaves int8 off for "pt2" and says why)."""
    import graphprune as gp

    model, data = tiny_inputs
    source = gp.save(gp.load(model), tmp_path / "m.pt2")
    report = tmp_path / "r.json"
    argv = ["--latency-cut", "0.2", "--data", data, "--no-cache", *NORMALISE, "--report", report]
    code, _, err = cli("optimize", source, *argv, "-o", tmp_path / "o.pt2")
    assert code == 0, err
    assert captured["config"].output_format == "pt2" and captured["config"].quantize == "auto"
    assert json.loads(report.read_text())["settings"]["output_format"] == "pt2" and (tmp_path / "o.pt2").exists()
    code, _, err = cli("optimize", source, *argv, "-o", tmp_path / "o.onnx")
    assert code == 0, err
    assert captured["config"].output_format == "onnx"
    with pytest.raises(GraphpruneError, match="output_format must be onnx or pt2"):
        dataclasses.replace(captured["config"], output_format="txt")


def test_user_gave_tells_an_option_set_from_its_default():
    """What lets a file's recorded normalisation stand in for --mean/--std the user did not give."""
    import click
    from click.testing import CliRunner

    from graphprune.cli_options import user_gave

    seen = []

    @click.command()
    @click.option("--mean", default="0.5")
    @click.option("--std", default="0.25")
    def command(mean, std):
        seen.append(user_gave("mean", "std"))

    for argv in ([], ["--std", "0.25"], ["--mean", "0.1"]):
        assert CliRunner().invoke(command, argv).exit_code == 0
    assert seen == [False, True, True]
