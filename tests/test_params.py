"""params.yaml is the composition of conf/, and stays so."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.core.params import compose

ROOT = Path(__file__).resolve().parent.parent


def test_params_yaml_equals_the_composition_of_conf():
    committed = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert committed == compose(conf_dir=ROOT / "conf"), "params.yaml is stale: run `python -m pipeline.core.params`"


def test_adding_a_model_is_one_override():
    default = list(yaml.safe_load(compose(conf_dir=ROOT / "conf"))["models"])
    steps = [f"run-step-{step}" for step in range(6)]
    assert default == ["smollm2-135m", "minilm-l6", "minilm-l6-int8", "paraphrase-minilm-l3", *steps]
    composed = yaml.safe_load(compose(["+model@models.llama-3-2-1b-synthetic=llama-3-2-1b-synthetic"], conf_dir=ROOT / "conf"))
    assert list(composed["models"]) == [*default, "llama-3-2-1b-synthetic"]
    assert composed["models"]["llama-3-2-1b-synthetic"]["format"] == "meta"


def test_each_version_of_the_demo_series_is_its_own_step():
    composed = yaml.safe_load(compose(conf_dir=ROOT / "conf"))
    versions = composed["series"]["run-demo"]
    assert [composed["models"][v]["source"]["step"] for v in versions] == list(range(6))
    assert {composed["models"][v]["source"]["synthetic"] for v in versions} == {"small-30522"}


def test_every_shipped_model_config_composes():
    default_models = yaml.safe_load(compose(conf_dir=ROOT / "conf"))["models"]
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        overrides = [] if path.stem in default_models else [f"+model@models.{path.stem}={path.stem}"]
        composed = yaml.safe_load(compose(overrides, conf_dir=ROOT / "conf"))
        assert composed["models"][path.stem]["format"] in {"meta", "safetensors", "gguf", "onnx"}, path.name
