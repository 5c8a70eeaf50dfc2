"""Settings from one source: the config dataclasses give the flags, the YAML keys and the help;
every shipped recipe loads through the exact command its first line documents."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from edgetune.cli import build_parser, main
from edgetune.config import (
    config_from_args,
    configs_dir,
    field_docs,
    flag_name,
    load_config,
    save_config,
    shipped_config,
)
from edgetune.errors import ConfigError
from edgetune.export.config import ExportConfig
from edgetune.quickstart import QuickstartConfig
from edgetune.runtime.sampling import SamplingConfig
from edgetune.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
COMMAND_CONFIG = {"train": TrainConfig, "export": ExportConfig}
REQUIRED = dict(model="m", data="d.jsonl", out="run")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_recipes_are_shipped_as_package_data():
    assert RECIPES and configs_dir() == ROOT / "examples" / "configs"
    assert shipped_config("tiny-phi3_qlora_cpu") == configs_dir() / "tiny-phi3_qlora_cpu.yaml"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["edgetune.configs"] == "examples/configs"
    assert "edgetune.configs" in setuptools["packages"]
    assert setuptools["package-data"]["edgetune.configs"] == ["*.yaml"]
    with pytest.raises(ConfigError, match="did you mean 'tiny-phi3_qlora_cpu'"):
        shipped_config("tiny-phi3_qlora_gpu")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_through_its_launch_command(recipe, monkeypatch):
    """``<model>_<method>_<device>.yaml``, first line the exact command; that command parses
    and every key of the file reaches the resolved config."""
    assert re.fullmatch(r"[a-z0-9.-]+_[a-z0-9-]+_(cpu|cuda)\.yaml", recipe.name), recipe.name
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# edgetune "), first
    argv = shlex.split(first[2:])[1:]
    assert argv[argv.index("--config") + 1] == f"examples/configs/{recipe.name}"
    monkeypatch.chdir(ROOT)
    cls = COMMAND_CONFIG[argv[0]]
    cfg = config_from_args(cls, build_parser(argv[0]).parse_args(argv))
    settings = yaml.safe_load(recipe.read_text())
    assert settings, recipe
    for key, value in settings.items():
        assert getattr(cfg, key) == value, key
    method = recipe.name.split("_")[1]
    assert method == (cfg.method if cls is TrainConfig else cfg.quant)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 2e-4 as the string '2e-4'
    assert yaml.safe_load("lr: 2e-4")["lr"] == "2e-4"
    cfg = load_config(
        TrainConfig, write(tmp_path, "lr: 2e-4\nmax_steps: 1e3\nalpha: 16\n"), REQUIRED
    )
    assert cfg.lr == 0.0002 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.alpha == 16.0 and isinstance(cfg.alpha, float)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rat: 1e-3\n", "unknown setting 'learning_rat' (did you mean 'lr'?)"),
        ("batchsize: 4\n", "unknown setting 'batchsize' (did you mean 'batch_size'?)"),
        ("lr: abc\n", "lr: expected a number, got 'abc'"),
        ("rank: 1.5\n", "rank: expected an integer, got 1.5"),
        ("packing: maybe\n", "packing: expected true or false, got 'maybe'"),
        (
            "method: qlroa\n",
            "method must be one of qlora, qdora, lora, dora, got 'qlroa' (did you mean 'qlora'?)",
        ),
        ("seq_len: null\n", "seq_len: expected an integer, got null"),
        ("- rank\n", "expected a mapping of settings"),
    ],
)
def test_bad_yaml_names_file_key_and_expected_type(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, path, REQUIRED)
    assert str(e.value) == f"{path}: {message}"


def test_bad_config_is_one_line_on_the_command_line(tmp_path, capsys):
    path = write(tmp_path, "rank: 8\nlr: abc\n")
    argv = [
        "train",
        "--config",
        str(path),
        "--model",
        "m",
        "--data",
        "d",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"edgetune train: error: {path}: lr: expected a number, got 'abc'\n"
    assert main(["train", "--model", "m", "--data", "d", "--out", "o", "--lr", "x"]) == 2
    assert "--lr: expected a number, got 'x'" in capsys.readouterr().err
    assert main(["train", "--data", "d", "--out", "o"]) == 2
    assert "missing required setting(s): model (flags --model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = write(tmp_path, "lr: 1e-3\nrank: 8\npacking: true\nmethod: lora\nmodel: from-yaml\n")
    argv = [
        "train",
        "--config",
        str(path),
        "--data",
        "d",
        "--out",
        "o",
        "--rank",
        "4",
        "--no-packing",
        "--model",
        "from-flag",
    ]
    cfg = config_from_args(TrainConfig, build_parser("train").parse_args(argv))
    assert (cfg.rank, cfg.packing, cfg.model) == (4, False, "from-flag")  # flags
    assert (cfg.lr, cfg.method) == (0.001, "lora")  # YAML
    assert cfg.batch_size == TrainConfig.batch_size  # default
    cfg = config_from_args(
        TrainConfig,
        build_parser("train").parse_args(
            ["train", "--config", str(path), "--data", "d", "--out", "o"]
        ),
    )
    assert (cfg.rank, cfg.packing, cfg.model) == (8, True, "from-yaml")


def test_saved_config_relaunches_the_same_run(tmp_path):
    """The resolved config saved with a run is what the launched workers read back
    (``edgetune.cli train --config FILE --resume``)."""
    cfg = TrainConfig(
        model="m",
        data="d.jsonl",
        out=str(tmp_path / "run"),
        eval_data=None,
        lr=2e-5,
        max_steps=7,
        packing=True,
        strategy="zero2",
        nproc=2,
        master_port=29501,
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, path) == cfg
    args = build_parser("train").parse_args(["train", "--config", str(path), "--resume"])
    assert config_from_args(TrainConfig, args) == cfg and args.resume


def test_export_flags_and_yaml(tmp_path):
    parse = build_parser("export").parse_args
    base = ["export", "merged", "--out", "b"]
    assert config_from_args(ExportConfig, parse(base)) == ExportConfig()
    assert config_from_args(ExportConfig, parse(base + ["--asymmetric"])).symmetric is False
    cfg = config_from_args(ExportConfig, parse(base + ["--algo", "hqq", "--symmetric"]))
    assert (cfg.algo, cfg.symmetric) == ("hqq", True)
    path = write(tmp_path, "algo: gptq\ngptq_damp: 5e-2\nact-order: yes\n")
    cfg = config_from_args(
        ExportConfig, parse(base + ["--config", str(path), "--block-size", "64"])
    )
    assert (cfg.algo, cfg.gptq_damp, cfg.act_order, cfg.block_size) == ("gptq", 0.05, True, 64)


def test_sampling_stop_is_repeatable_and_takes_several():
    args = build_parser("run").parse_args(
        ["run", "b", "--prompt", "hi", "--stop", "a", "--stop", "b", "c", "--top-p", "0.9"]
    )
    cfg = config_from_args(SamplingConfig, args)
    assert cfg.stop == ("a", "b", "c") and cfg.top_p == 0.9


def _flags(command: str) -> dict[str, str]:
    """option string -> help of one subcommand's parser."""
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.choices and command in a.choices)
    return {o: a.help or "" for a in sub.choices[command]._actions for o in a.option_strings}


@pytest.mark.parametrize(
    "command, cls",
    [
        ("train", TrainConfig),
        ("export", ExportConfig),
        ("run", SamplingConfig),
        ("chat", SamplingConfig),
        ("quickstart", QuickstartConfig),
    ],
)
def test_every_field_has_a_flag_with_its_docstring_as_help(command, cls):
    flags, docs = _flags(command), field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        help_text = flags.get(flag_name(f.name))
        assert help_text is not None, f"no {flag_name(f.name)} on {command}"
        assert help_text.startswith(docs[f.name].replace("%", "%%")), f.name


def test_documented_flag_names_still_exist():
    """The names users and scripts rely on (docs/design.md's CLI contract, README, tests)."""
    expected = {
        "train": "--model --data --eval-data --method --rank --alpha --dropout --max-steps "
        "--epochs --lr --batch-size --grad-accum --seq-len --seed --eval-every "
        "--save-every --packing --gradient-checkpointing --strict --device --out "
        "--resume --config --nproc --strategy --nnodes --node-rank --master-addr "
        "--master-port",
        "export": "--out --quant --block-size --target --force --symmetric --asymmetric "
        "--accuracy-level --lm-head --eval-data --eval-tokens --algo --embedding "
        "--calib-data --calib-tokens --act-order",
        "run": "--prompt --backend --max-new-tokens --stream --raw --system --threads "
        "--temperature --top-k --top-p --repetition-penalty --stop --seed",
        "quickstart": "--out --max-steps --force",
    }
    for command, names in expected.items():
        missing = set(names.split()) - set(_flags(command))
        assert not missing, (command, missing)


def test_quickstart_trained_and_exported_with_the_shipped_recipes(quickstart_run):
    import json

    from edgetune.bundle import MANIFEST

    out = quickstart_run[1]
    saved = yaml.safe_load((out / "run" / "config.yaml").read_text())
    recipe = load_config(TrainConfig, shipped_config(QuickstartConfig.recipe), REQUIRED)
    for key in yaml.safe_load(shipped_config(QuickstartConfig.recipe).read_text()):
        assert saved[key] == getattr(recipe, key), key
    export_recipe = load_config(ExportConfig, shipped_config(QuickstartConfig.export_recipe))
    quant = json.loads((out / "bundle" / MANIFEST).read_text())["quantization"]
    assert quant["quant"] == export_recipe.quant
