"""`tierflow serve` names the application after the model, or finds the one the store knows."""

import argparse

import pytest

from serving.config import ServingError
from serving.rollout import STATE
from storage import ArtifactStore, StoreConfig
from workflows.serve_cli import _default_app, app_for_model


def test_deploy_and_build_name_the_app_after_the_model():
    assert app_for_model("models:/breast-cancer/1") == "breast-cancer"
    assert app_for_model("models:/My_Model@champion") == "my-model"
    with pytest.raises(ServingError, match="pass --app"):
        app_for_model("models:/42/1")


def test_status_uses_the_one_app_the_store_knows_and_asks_otherwise(tmp_path):
    store = str(tmp_path / "store")
    args = argparse.Namespace(serve_command="status", store=store)
    with pytest.raises(ServingError, match="nothing was deployed"):
        _default_app(args)
    s = ArtifactStore(StoreConfig.from_urls([store]))
    s.put_document((STATE, "wine", "state"), {"stable": None})
    assert _default_app(args) == "wine"
    s.put_document((STATE, "digits", "state"), {"stable": None})
    with pytest.raises(ServingError, match="the store knows digits, wine; pass --app"):
        _default_app(args)


def test_a_new_version_goes_to_the_app_already_serving_its_model(tmp_path):
    store = str(tmp_path / "store")
    s = ArtifactStore(StoreConfig.from_urls([store]))
    s.put_document((STATE, "digits", "state"), {"stable": {"model_name": "tierflow-digits", "version": "2"}})
    deploy = argparse.Namespace(serve_command="deploy", store=store, model_uri="models:/tierflow-digits/3")
    assert _default_app(deploy) == "digits"  # what `tierflow run digits` deployed it as
    other = argparse.Namespace(serve_command="build", store=store, model_uri="models:/wine/1")
    assert _default_app(other) == "wine"
