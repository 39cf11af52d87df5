"""Configuration errors must fail at start-up with a message that names the culprit:
unknown keys (Hydra, against the dataclass schema), bad values (``to_config``), a missing
prepared corpus, and a model vocabulary too small for the tokenizer."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hai_llm.config.schema import to_config


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import hai_llm.launch.train  # noqa: F401  (registers the schema)
    from hai_llm.config.load import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


BASE = ["model=tiny", "parallel=single", "train.global_batch=4", "train.micro_batch=2", "train.device=cpu",
        "logging.wandb=disabled", "logging.progress=false", "logging.plot=false"]


def test_default_config_composes_and_validates():
    cfg = to_config(_compose([]))
    assert cfg.model.name == "small"
    cfg = to_config(_compose(BASE))
    assert cfg.model.name == "tiny" and cfg.model.dim == 64 and cfg.parallel.dp == 1


@pytest.mark.parametrize("override, key", [
    ("model.foo=1", "foo"),
    ("train.stepz=3", "stepz"),
    ("optim.learning_rate=1e-3", "learning_rate"),
])
def test_unknown_key_fails_with_hydra_message(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as ei:
        _compose(BASE + [override])
    text = f"{ei.value} {ei.value.__cause__}"
    assert key in text and "not in" in text, text


def test_wrong_type_fails_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="train.steps"):
        _compose(BASE + ["train.steps=many"])


def test_unknown_model_name_lists_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="tiny"):
        _compose(["model=tinyy"])


@pytest.mark.parametrize("overrides, msg", [
    (["train.precision=fp16"], r"train.precision must be fp32 \| bf16 \| fp8, got 'fp16'"),
    (["optim.schedule=linear"], r"optim.schedule must be constant \| cosine \| deepseek \| deepseek_v3, got 'linear'"),
    (["train.ema_decay=1.0"], r"train.ema_decay must be in \[0, 1\), got 1.0"),
    (["data.seq_len=1024"], r"data.seq_len=1024 exceeds model.max_seq_len=256"),
    (["train.steps=0"], r"train.steps must be >= 1, got 0"),
])
def test_bad_values_fail_in_to_config(overrides, msg):
    cfg = _compose(BASE + overrides)  # composes: types are right, values are not
    with pytest.raises(ValueError, match=msg):
        to_config(cfg)


@pytest.mark.parametrize("overrides, msg", [
    (["train.micro_batch=3"], r"train.global_batch / dp = 4 sequences per rank must be divisible by "
                              r"train.micro_batch=3"),
    (["parallel.nprocs=2", "parallel.dp=2", "train.micro_batch=4"],
     r"train.global_batch / dp = 2 sequences per rank must be divisible by train.micro_batch=4"),
    (["parallel.nprocs=3", "parallel.dp=3"], r"train.global_batch=4 must be divisible by parallel.dp=3"),
    (["parallel.dp=2"], r"parallel.pp=1 x parallel.dp=2 x parallel.sp=1 = 2 but the job has 1 ranks"),
    (["parallel.schedule=gpipe"], r"parallel.schedule='gpipe' is unknown"),
    (["parallel.transport=ring"], r"parallel.transport='ring' is unknown"),
])
def test_bad_layouts_fail_in_build_layout(overrides, msg):
    """Checks that depend on the layout (batch splits, degrees, schedule) are the layout's:
    ``build_layout`` raises them, before any process starts."""
    from hai_llm.layout import build_layout

    cfg = to_config(_compose(BASE + overrides))  # the values themselves are fine
    with pytest.raises(ValueError, match=msg):
        build_layout(cfg, cfg.parallel.nprocs)


def test_invalid_model_combination_fails_in_to_config():
    cfg = _compose(BASE + ["model.n_limited_groups=5"])
    with pytest.raises(Exception, match=r"n_limited_groups=5 must be in \[1, n_expert_groups=4\]"):
        to_config(cfg)


def test_missing_data_path_names_prepare_tool(make_config, tmp_path):
    from hai_llm.train.trainer import Trainer

    cfg = make_config(tmp_path, "data.path=/nonexistent/corpus")
    with pytest.raises(FileNotFoundError, match=r"no prepared corpus at /nonexistent/corpus.*hai-llm-prepare"):
        Trainer(cfg)


def test_model_vocab_smaller_than_tokenizer_fails(make_config, tmp_path):
    from hai_llm.train.trainer import Trainer

    cfg = make_config(tmp_path, "model.vocab_size=200")  # the byte tokenizer has 259 ids
    with pytest.raises(ValueError, match=r"tokenizer vocab \(259 ids.*does not fit model vocab_size 200"):
        Trainer(cfg)


def test_load_model_args_unknown_key_and_name():
    from hai_llm.config.load import load_model_args

    with pytest.raises(Exception, match="foo"):
        load_model_args("tiny", ["foo=1"])
    with pytest.raises(FileNotFoundError, match="known names: .*tiny"):
        load_model_args("no_such_model")
    assert load_model_args("tiny", ["n_layers=4"]).n_layers == 4


def test_resolved_config_round_trips(tmp_path):
    """The YAML that a run saves composes back into the same validated Config."""
    cfg = _compose(BASE + [f"train.out_dir={tmp_path}"])
    text = OmegaConf.to_yaml(cfg, resolve=True)
    from hai_llm.config.schema import Config

    again = to_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
    assert again == to_config(cfg)
