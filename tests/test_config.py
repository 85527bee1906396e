import pytest
import yaml

from cocord_fast.config import (Config, describe_fields, load_config, parse_override,
                                save_config)
from cocord_fast.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.2\n  milestones: [1, 2]\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["optim.lr=0.3", "train.seed=7"])
    assert cfg.optim.lr == 0.3  # override beats file
    assert cfg.optim.milestones == [1, 2]  # file beats default
    assert cfg.train.epochs == 5 and cfg.train.seed == 7
    assert cfg.optim.momentum == Config().optim.momentum  # untouched default


def test_base_is_below_file_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n")
    cfg = load_config(path, ["train.seed=3"], base={"train": {"epochs": 9, "seed": 1, "log_every": 4}})
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.log_every) == (5, 3, 4)


def test_int_is_accepted_for_float_and_converted():
    cfg = load_config(overrides=["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_typed_values_pass_as_written():
    cfg = load_config(overrides=["train.compile=true", "train.device=cuda:3",
                                 'train.output_dir="010"', "data.backend=torch"])
    assert (cfg.train.compile, cfg.train.device, cfg.train.output_dir) == (True, "cuda:3", "010")
    assert load_config(overrides=["train.compile=false"]).train.compile is False
    assert load_config(overrides=["train.compile=max-autotune"]).train.compile == "max-autotune"


def test_exponent_literals_are_floats(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  weight_decay: 5e-4\n"), ["optim.lr=1e-2"])
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 0.01
    with pytest.raises(UserError, match="optim.lr: expected float, got 'fast'"):
        load_config(overrides=["optim.lr=fast"])


def test_required_interface_names_exist():
    cfg = load_config(overrides=["model.student=resnet20", "model.teacher=resnet56",
                                 "model.teacher_checkpoint=t.pth", "data.root=/d",
                                 "train.max_steps=10", "train.log_every=2", "train.ckpt_every=5",
                                 "train.output_dir=out", "train.seed=1"])
    assert (cfg.model.student, cfg.model.teacher, cfg.model.teacher_checkpoint) == (
        "resnet20", "resnet56", "t.pth")
    assert (cfg.data.root, cfg.train.max_steps, cfg.train.log_every, cfg.train.ckpt_every,
            cfg.train.output_dir, cfg.train.seed) == ("/d", 10, 2, 5, "out", 1)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'train.epoch'; valid keys in 'train': epochs, max_steps"),
    ("trian.epochs=3", "unknown config section 'trian'"),
    ("train.epochs=three", "train.epochs: expected int, got 'three'"),
    ("train.epochs=2.5", "train.epochs: expected int, got 2.5"),
    ("train.epochs=0", "train.epochs: 0 is below the minimum 1"),
    ("optim.momentum=1.5", "optim.momentum: 1.5 is above the maximum 1.0"),
    ("optim.lr=true", "optim.lr: expected float, got True"),
    ("train.progress=1", "train.progress: expected true or false, got 1"),
    ("optim.schedule=linear", "optim.schedule: 'linear' is not one of step, cosine"),
    ("optim.milestones=5", "optim.milestones: expected a list of int, got 5"),
    ("optim.milestones=[1, x]", "optim.milestones[1]: expected int, got 'x'"),
    ("model.student=[1]", "model.student: expected a string, got [1]"),
    ("train.compile=0", "train.compile: 0 is not one of false, true, default"),
    ("train.compile=1", "train.compile: 1 is not one of false, true, default"),
    ("data.backend=1", "data.backend: 1 is not one of auto, dali, torch"),
    ("train.device=gpu", "train.device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:x", "train.device: 'cuda:x' is not auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:-1", "train.device: 'cuda:-1' is not auto, cpu, cuda or cuda:N"),
    ("train.output_dir=010", "train.output_dir: expected a string, got the number 8; quote it"),
    ("model.teacher=18", "model.teacher: expected a string, got the number 18; quote it"),
    ("train.epochs", "expected section.key=value"),
    ("epochs=3", "expected section.key=value"),
    ("optim.lr=[1", "not valid YAML"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(UserError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_unknown_key_in_file_names_the_key(tmp_path):
    path = write(tmp_path, "data:\n  bach_size: 3\n")
    with pytest.raises(UserError, match="unknown key 'data.bach_size'.*batch_size"):
        load_config(path)


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(UserError, match="train: expected a mapping"):
        load_config(write(tmp_path, "train: 5\n"))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["optim.milestones=[3, 4]", "model.teacher=wrn_40_2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["milestones"] == [3, 4]


def test_parse_override_reads_yaml_values():
    assert parse_override("optim.milestones=[1,2]") == {"optim": {"milestones": [1, 2]}}
    assert parse_override("model.teacher_checkpoint=") == {"model": {"teacher_checkpoint": ""}}


def test_each_method_has_its_section_and_a_run_saves_only_its_own(tmp_path):
    cfg = load_config(overrides=["method.name=dkd", "dkd.beta=2", "dist.temperature=1"])
    assert (cfg.dkd.beta, cfg.dist.temperature, cfg.cocord.queue_size) == (2.0, 1.0, 2048)
    with pytest.raises(UserError, match=r"dkd.beta: -1.0 is below the minimum 0.0"):
        load_config(overrides=["dkd.beta=-1"])
    assert [section for section in cfg.to_dict()] == ["model", "data", "method", "dkd", "optim",
                                                      "train", "engine"]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == load_config(
        overrides=["method.name=dkd", "dkd.beta=2"])  # the other method's setting is not kept
    # A saved config's section of a method no longer installed is passed over; a file's is not.
    saved = {**cfg.to_dict(), "gone": {"weight": 1.0}}
    assert load_config(base=saved).dkd.beta == 2.0
    (tmp_path / "gone.yaml").write_text("gone:\n  weight: 1.0\n")
    with pytest.raises(UserError, match="unknown config section 'gone'"):
        load_config(tmp_path / "gone.yaml")


def test_describe_fields_lists_every_key_with_help():
    text = describe_fields()
    for section, values in Config().sections().items():
        assert f"{section}:" in text
        for key in vars(values):
            assert f"  {key}: " in text
    assert "# stop after this many optimizer steps" in text
