//! The worker's model manager: which models it knows, which are resident, what engine
//! speaks for a model id.
//!
//! Only the mock engine exists today, so every id resolves to it (PROTOCOL.md §2: "any
//! unknown id in mock mode"). The manager still keeps real state (what was loaded, when, how
//! long it took) because ListModels / GetCapabilities / the Redis record report it, and a real
//! engine (espeak, a neural model) slots in behind [`Engine`] later.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use crate::proto::{LoadModelResponse, ModelInfo, UnloadModelResponse};

/// The model resident when the worker starts.
pub const DEFAULT_MODEL: &str = "mock-440hz";

/// Languages every model here speaks (the mock says "beep" in any language; we claim English
/// only, like the system we replace).
pub const LANGUAGES: &[&str] = &["en"];

/// The engine that synthesises for a model id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The 440 Hz sine of [`super::mock`].
    Mock,
}

impl Engine {
    /// The `family` reported in [`ModelInfo`].
    pub fn family(self) -> &'static str {
        match self {
            Engine::Mock => "mock",
        }
    }
}

#[derive(Debug, Clone)]
struct Model {
    engine: Engine,
    loaded: bool,
    load_duration_ms: i64,
}

/// Thread-safe catalogue of models. Operations are short critical sections (no I/O under
/// the lock), so RPCs never wait on each other for long.
#[derive(Debug)]
pub struct ModelManager {
    models: Mutex<BTreeMap<String, Model>>,
}

impl Default for ModelManager {
    fn default() -> Self {
        ModelManager::new()
    }
}

impl ModelManager {
    /// A manager with [`DEFAULT_MODEL`] resident.
    pub fn new() -> ModelManager {
        let mut models = BTreeMap::new();
        models.insert(
            DEFAULT_MODEL.to_owned(),
            Model {
                engine: Engine::Mock,
                loaded: true,
                load_duration_ms: 0,
            },
        );
        ModelManager {
            models: Mutex::new(models),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Model>> {
        // Each update is a single map operation; a poisoned map is still consistent.
        self.models.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which engine speaks for `model_id`. Every id maps to the mock while it is the only
    /// engine; an empty id means the default model.
    pub fn engine_for(&self, _model_id: &str) -> Engine {
        Engine::Mock
    }

    /// Every known model, loaded or not, sorted by id.
    pub fn list(&self) -> Vec<ModelInfo> {
        self.lock()
            .iter()
            .map(|(id, m)| model_info(id, m))
            .collect()
    }

    /// Ids of the resident models, sorted.
    pub fn resident(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, m)| m.loaded)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Loads `model_id`. With `preload_only` the model is prepared and catalogued but not
    /// made resident. Loading a resident model is a cheap success.
    pub fn load(&self, model_id: &str, preload_only: bool) -> LoadModelResponse {
        if model_id.trim().is_empty() {
            return LoadModelResponse {
                success: false,
                message: "model_id is required".to_owned(),
                load_duration_ms: 0,
            };
        }
        let started = Instant::now();
        let engine = self.engine_for(model_id);
        // The mock engine has no weights: "loading" is registering it. A real engine would
        // do its I/O here, outside the lock.
        let load_duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let mut models = self.lock();
        let entry = models.entry(model_id.to_owned()).or_insert(Model {
            engine,
            loaded: false,
            load_duration_ms,
        });
        let message = if entry.loaded {
            format!("{model_id} is already loaded")
        } else if preload_only {
            format!("{model_id} preloaded ({} engine)", engine.family())
        } else {
            entry.loaded = true;
            entry.load_duration_ms = load_duration_ms;
            format!("{model_id} loaded ({} engine)", engine.family())
        };
        LoadModelResponse {
            success: true,
            message,
            load_duration_ms: entry.load_duration_ms,
        }
    }

    /// Evicts `model_id`. Unknown or not resident → `success: false`.
    pub fn unload(&self, model_id: &str) -> UnloadModelResponse {
        let mut models = self.lock();
        match models.get_mut(model_id) {
            Some(m) if m.loaded => {
                m.loaded = false;
                UnloadModelResponse {
                    success: true,
                    message: format!("{model_id} unloaded"),
                }
            }
            Some(_) => UnloadModelResponse {
                success: false,
                message: format!("{model_id} is not loaded"),
            },
            None => UnloadModelResponse {
                success: false,
                message: format!("unknown model {model_id:?}"),
            },
        }
    }
}

fn model_info(id: &str, m: &Model) -> ModelInfo {
    let mut metadata = HashMap::new();
    metadata.insert("engine".to_owned(), m.engine.family().to_owned());
    if m.engine == Engine::Mock {
        metadata.insert(
            "frequency_hz".to_owned(),
            super::mock::FREQUENCY_HZ.to_string(),
        );
    }
    metadata.insert(
        "load_duration_ms".to_owned(),
        m.load_duration_ms.to_string(),
    );
    ModelInfo {
        model_id: id.to_owned(),
        family: m.engine.family().to_owned(),
        is_loaded: m.loaded,
        languages: LANGUAGES.iter().map(|s| (*s).to_owned()).collect(),
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_model_is_resident() {
        let m = ModelManager::new();
        assert_eq!(m.resident(), vec![DEFAULT_MODEL.to_owned()]);
        let list = m.list();
        assert_eq!(list.len(), 1);
        assert!(list[0].is_loaded);
        assert_eq!(list[0].family, "mock");
        assert_eq!(list[0].languages, vec!["en".to_owned()]);
    }

    #[test]
    fn load_unload_cycle() {
        let m = ModelManager::new();
        let r = m.load("mock-fast", false);
        assert!(r.success, "{}", r.message);
        assert!(r.load_duration_ms >= 0);
        assert_eq!(
            m.resident(),
            vec!["mock-440hz".to_owned(), "mock-fast".to_owned()]
        );
        assert!(m.load("mock-fast", false).success); // already loaded: still fine
        assert!(m.unload("mock-fast").success);
        let again = m.unload("mock-fast");
        assert!(!again.success);
        assert!(again.message.contains("not loaded"));
        assert_eq!(m.list().len(), 2); // still catalogued
        assert!(!m.unload("never-seen").success);
        assert!(!m.load("", false).success);
    }

    #[test]
    fn preload_catalogues_without_making_resident() {
        let m = ModelManager::new();
        assert!(m.load("mock-x", true).success);
        assert_eq!(m.resident(), vec![DEFAULT_MODEL.to_owned()]);
        let info = m
            .list()
            .into_iter()
            .find(|i| i.model_id == "mock-x")
            .unwrap();
        assert!(!info.is_loaded);
    }

    #[test]
    fn any_id_is_spoken_by_the_mock() {
        let m = ModelManager::new();
        assert_eq!(m.engine_for("mock-440hz"), Engine::Mock);
        assert_eq!(m.engine_for("piper-en-us"), Engine::Mock);
        assert_eq!(m.engine_for(""), Engine::Mock);
    }
}
