//! The worker's model manager: which models exist, which are resident, who uses them, and
//! when an idle one is evicted.
//!
//! Models are ids, and the catalogue is fixed when the worker starts: `mock-440hz` plus the
//! installed espeak-ng voices (`espeak-*`, listed at start-up). Nothing a client sends ever
//! adds an entry: an earlier version made every unknown StartSession id a new resident mock
//! model, so seven made-up ids filled all eight resident slots and a few hundred long ids grew
//! ListModels to megabytes, and showed every client the ids other clients had typed.
//! Ids resolve ([`ModelManager::canonical`]) as follows: a catalogued id is itself; any other
//! id starting with `mock` is an alias of the one mock model (the orchestrator's tests and
//! benchmarks keep their 440 Hz voice under any `mock-*` name); with `--mock-any-model` every
//! unknown id is that alias too (docs/PROTOCOL.md §2's "any unknown id in mock mode", off by
//! default); everything else is refused as an unknown model. Ids longer than
//! [`MAX_MODEL_ID_BYTES`] are refused before any lookup.
//!
//! Lifecycle, and why each rule exists:
//! - **Loading** makes a model resident. For espeak that means a warm-up synthesis (proves
//!   the voice works, pulls its data into the page cache; its time is `load_duration_ms`)
//!   and a warm process kept ready, so the first clause of a session does not pay espeak's
//!   start-up. Loading happens on `LoadModel`, at start-up (`--default-model`, `--preload`),
//!   or on demand when `StartSession` names a model that is not resident.
//! - **Reference counts**: each session holds one reference to its model from StartSession to
//!   EndSession. A model in use is never evicted and cannot be unloaded.
//! - **TTL**: a resident model unused (no references, no synthesis started) for `--model-ttl-secs`
//!   is evicted, so a burst of exotic voices does not keep processes around forever.
//! - **Resident cap** (`--max-resident-models`): loading one more evicts the least recently
//!   used idle model; if every resident model is in use or pinned, the load fails.
//! - **Pinned**: the default model and `--preload` models stay resident (no TTL, no LRU) until
//!   an explicit `UnloadModel`: the operator asked for them to be warm.
//!
//! Every lock is a short critical section with no I/O and no await under it; warm-ups run
//! outside the lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::espeak::{Espeak, Voice, VoiceRuntime, MODEL_PREFIX};
use crate::proto::{LoadModelResponse, ModelInfo, UnloadModelResponse};

/// The model of sessions that name none, unless `--default-model` says otherwise.
pub const DEFAULT_MODEL: &str = MOCK_MODEL;
/// The one mock model of the catalogue; every `mock*` id is an alias of it.
pub const MOCK_MODEL: &str = "mock-440hz";
/// Longest model id accepted anywhere (StartSession, LoadModel, UnloadModel, flags): real ids
/// are short, and a bound keeps error messages that echo the id small.
pub const MAX_MODEL_ID_BYTES: usize = 128;
/// Languages the mock claims (it says "beep" in any language; English, like the system we
/// replace).
pub const MOCK_LANGUAGES: &[&str] = &["en"];
/// Default idle time after which an unpinned model is evicted.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);
/// Default number of resident models.
pub const DEFAULT_MAX_RESIDENT: usize = 8;

/// The engine that synthesises for a model id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// The 440 Hz sine of [`super::mock`].
    Mock,
    /// An espeak-ng voice.
    Espeak(Voice),
}

impl Engine {
    /// The `family` reported in [`ModelInfo`].
    pub fn family(&self) -> &'static str {
        match self {
            Engine::Mock => "mock",
            Engine::Espeak(_) => "espeak",
        }
    }

    fn languages(&self) -> Vec<String> {
        match self {
            Engine::Mock => MOCK_LANGUAGES.iter().map(|s| (*s).to_owned()).collect(),
            Engine::Espeak(v) => v.languages(),
        }
    }
}

/// What a synthesis speaks with (cheap to clone; keeps an evicted voice usable until the
/// synthesis ends).
#[derive(Debug, Clone)]
pub enum EngineHandle {
    /// The sine.
    Mock,
    /// An espeak-ng voice and its warm process.
    Espeak(Arc<VoiceRuntime>),
}

/// Why a model operation failed. The text goes to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// LoadModel / UnloadModel without an id.
    #[error("model_id is required")]
    MissingId,
    /// An `espeak-*` id that is not an installed voice.
    #[error("unknown model {id:?}: no installed espeak-ng voice has that id (e.g. {examples})")]
    UnknownVoice {
        /// The id asked for.
        id: String,
        /// A few ids that do exist.
        examples: String,
    },
    /// An `espeak-*` id on a worker without espeak-ng.
    #[error(
        "model {0:?} needs espeak-ng, which this worker does not have (apt-get install espeak-ng)"
    )]
    EngineMissing(String),
    /// The warm-up failed.
    #[error("cannot load {id}: {reason}")]
    LoadFailed {
        /// The model.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// The resident cap is reached and nothing can be evicted.
    #[error(
        "cannot load {id}: {max} models are resident (--max-resident-models) and all are in use or pinned"
    )]
    Full {
        /// The model.
        id: String,
        /// The cap.
        max: usize,
    },
    /// UnloadModel of a model sessions still use.
    #[error("{id} is in use by {refs} session(s); end them first")]
    InUse {
        /// The model.
        id: String,
        /// Sessions holding it.
        refs: usize,
    },
    /// UnloadModel of a catalogued model that is not resident.
    #[error("{0} is not loaded")]
    NotLoaded(String),
    /// An id that is not in the catalogue and is no alias of a catalogued model.
    #[error(
        "unknown model {0:?}: this worker has mock-440hz (alias: any mock-* id) and its \
         installed espeak-ng voices (see ListModels)"
    )]
    Unknown(String),
    /// An id longer than [`MAX_MODEL_ID_BYTES`] (not echoed back).
    #[error("model id of {0} bytes refused: at most 128 bytes")]
    TooLong(usize),
}

/// Model-manager settings (from the worker's flags).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Model of sessions that name none; pinned.
    pub default_model: String,
    /// Loaded and pinned at start-up.
    pub preload: Vec<String>,
    /// Idle time before an unpinned, unused model is evicted (`None`: never).
    pub ttl: Option<Duration>,
    /// Most resident models at once (at least 1).
    pub max_resident: usize,
    /// `--mock-any-model`: ids outside the catalogue speak with the mock instead of being
    /// refused (still one catalogue entry, never a new one).
    pub mock_any_model: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            default_model: DEFAULT_MODEL.to_owned(),
            preload: Vec::new(),
            ttl: Some(DEFAULT_TTL),
            max_resident: DEFAULT_MAX_RESIDENT,
            mock_any_model: false,
        }
    }
}

#[derive(Debug)]
struct Model {
    engine: Engine,
    /// espeak only: created on first use and kept (it is just the voice plus a spare slot).
    runtime: Option<Arc<VoiceRuntime>>,
    resident: bool,
    pinned: bool,
    refs: usize,
    last_used: Instant,
    load_duration_ms: i64,
    loads: u64,
}

impl Model {
    fn new(engine: Engine) -> Model {
        Model {
            engine,
            runtime: None,
            resident: false,
            pinned: false,
            refs: 0,
            last_used: Instant::now(),
            load_duration_ms: 0,
            loads: 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    models: BTreeMap<String, Model>,
    loads_total: u64,
    evictions_total: u64,
}

impl State {
    fn resident_count(&self) -> usize {
        self.models.values().filter(|m| m.resident).count()
    }

    /// Makes `id` non-resident (no checks); `counted` for evictions (TTL, cap) as opposed to
    /// an explicit UnloadModel.
    fn evict(&mut self, id: &str, counted: bool) {
        if let Some(m) = self.models.get_mut(id) {
            if m.resident {
                m.resident = false;
                m.pinned = false;
                if let Some(rt) = &m.runtime {
                    rt.set_warm(false);
                }
                if counted {
                    self.evictions_total += 1;
                }
                tracing::info!(model = id, evicted = counted, "model unloaded");
            }
        }
    }

    /// Frees a resident slot for `id` if the cap requires it (LRU among idle unpinned).
    fn make_room(&mut self, id: &str, max: usize) -> Result<(), ModelError> {
        while self.resident_count() >= max {
            let victim = self
                .models
                .iter()
                .filter(|(k, m)| m.resident && !m.pinned && m.refs == 0 && k.as_str() != id)
                .min_by_key(|(_, m)| m.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(v) => self.evict(&v, true),
                None => {
                    return Err(ModelError::Full {
                        id: id.to_owned(),
                        max,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Thread-safe catalogue and lifecycle of models.
#[derive(Debug)]
pub struct ModelManager {
    state: Mutex<State>,
    espeak: Option<Arc<Espeak>>,
    config: ManagerConfig,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ModelManager {
    /// A manager knowing the mock and (if given) every installed espeak-ng voice, nothing
    /// resident yet: call [`ModelManager::start`].
    pub fn new(config: ManagerConfig, espeak: Option<Arc<Espeak>>) -> ModelManager {
        let mut state = State::default();
        state
            .models
            .insert(MOCK_MODEL.to_owned(), Model::new(Engine::Mock));
        if let Some(e) = &espeak {
            for v in e.voices() {
                state
                    .models
                    .insert(v.model_id.clone(), Model::new(Engine::Espeak(v.clone())));
            }
        }
        let config = ManagerConfig {
            max_resident: config.max_resident.max(1),
            ..config
        };
        ModelManager {
            state: Mutex::new(state),
            espeak,
            config,
        }
    }

    /// Loads and pins the default model and the `--preload` list. Fails (the worker should
    /// not start) when one of them cannot be loaded.
    pub async fn start(&self) -> Result<(), ModelError> {
        let mut ids = vec![self.config.default_model.clone()];
        ids.extend(self.config.preload.iter().cloned());
        for id in ids {
            let id = self.canonical(&id)?;
            let took = self.load_resident(&id, true).await?;
            tracing::info!(model = %id, load_ms = millis(took), "model loaded");
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each update leaves the map consistent; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model of sessions that name none.
    pub fn default_model(&self) -> &str {
        &self.config.default_model
    }

    /// True when espeak-ng voices are available.
    pub fn has_espeak(&self) -> bool {
        self.espeak.is_some()
    }

    /// The catalogue id that speaks for `id` (the default model for an empty id; see the
    /// module docs for aliases), or why there is none. Never adds to the catalogue.
    pub fn canonical(&self, id: &str) -> Result<String, ModelError> {
        let id = if id.is_empty() {
            self.config.default_model.as_str()
        } else {
            id
        };
        if id.len() > MAX_MODEL_ID_BYTES {
            return Err(ModelError::TooLong(id.len()));
        }
        if id.trim().is_empty() {
            return Err(ModelError::MissingId);
        }
        if self.lock().models.contains_key(id) {
            return Ok(id.to_owned());
        }
        if id.starts_with(MODEL_PREFIX) {
            // Refused even with --mock-any-model: an espeak id speaking as a sine would hide
            // a typo or a missing voice.
            let Some(espeak) = &self.espeak else {
                return Err(ModelError::EngineMissing(id.to_owned()));
            };
            return Err(ModelError::UnknownVoice {
                id: id.to_owned(),
                examples: ["espeak-en-us", "espeak-en-gb", "espeak-de"]
                    .iter()
                    .filter(|e| espeak.voice(e).is_some())
                    .copied()
                    .chain(espeak.voices().iter().map(|v| v.model_id.as_str()))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if id.starts_with("mock") || self.config.mock_any_model {
            return Ok(MOCK_MODEL.to_owned());
        }
        Err(ModelError::Unknown(id.to_owned()))
    }

    /// Which engine speaks for `id` (any id [`ModelManager::canonical`] accepts).
    pub fn engine_for(&self, id: &str) -> Result<Engine, ModelError> {
        let id = self.canonical(id)?;
        self.lock()
            .models
            .get(&id)
            .map(|m| m.engine.clone())
            .ok_or(ModelError::Unknown(id))
    }

    /// The catalogue entry's runtime (created on first use), for espeak models.
    fn runtime_of(&self, m: &mut Model) -> Option<Arc<VoiceRuntime>> {
        match (&m.engine, &self.espeak) {
            (Engine::Espeak(v), Some(e)) => Some(
                m.runtime
                    .get_or_insert_with(|| Arc::new(VoiceRuntime::new(e.clone(), v.clone())))
                    .clone(),
            ),
            _ => None,
        }
    }

    /// Makes `id` resident (warm-up outside the lock, then the cap); `pin` keeps it there.
    /// Returns the load time (zero when it already was resident).
    async fn load_resident(&self, id: &str, pin: bool) -> Result<Duration, ModelError> {
        let runtime = {
            let mut st = self.lock();
            let m = st
                .models
                .get_mut(id)
                .ok_or_else(|| ModelError::Unknown(id.to_owned()))?;
            if m.resident {
                m.pinned |= pin;
                m.last_used = Instant::now();
                return Ok(Duration::ZERO);
            }
            self.runtime_of(m)
        };
        let started = Instant::now();
        if let Some(rt) = &runtime {
            rt.warm_up().await.map_err(|e| ModelError::LoadFailed {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let took = started.elapsed();
        let mut st = self.lock();
        if st.models.get(id).is_some_and(|m| m.resident) {
            // A concurrent load won; that is fine.
            if let Some(m) = st.models.get_mut(id) {
                m.pinned |= pin;
            }
            return Ok(took);
        }
        st.make_room(id, self.config.max_resident)?;
        st.loads_total += 1;
        if let Some(m) = st.models.get_mut(id) {
            m.resident = true;
            m.pinned |= pin;
            m.last_used = Instant::now();
            m.load_duration_ms = millis(took);
            m.loads += 1;
            if let Some(rt) = &m.runtime {
                rt.set_warm(true);
            }
        }
        Ok(took)
    }

    /// LoadModel. With `preload_only` the model is checked (and its data warmed) but not
    /// made resident. Loading a resident model is a cheap success.
    pub async fn load(&self, model_id: &str, preload_only: bool) -> LoadModelResponse {
        let fail = |e: ModelError| LoadModelResponse {
            success: false,
            message: e.to_string(),
            load_duration_ms: 0,
        };
        if model_id.trim().is_empty() {
            return fail(ModelError::MissingId);
        }
        let asked = model_id;
        let model_id = match self.canonical(asked) {
            Ok(id) => id,
            Err(e) => return fail(e),
        };
        let model_id = model_id.as_str();
        let alias = if asked == model_id {
            String::new()
        } else {
            format!(" ({asked} is an alias of {model_id})")
        };
        let already = self
            .lock()
            .models
            .get_mut(model_id)
            .filter(|m| m.resident)
            .map(|m| {
                m.last_used = Instant::now();
                m.load_duration_ms
            });
        if let Some(ms) = already {
            return LoadModelResponse {
                success: true,
                message: format!("{model_id} is already loaded{alias}"),
                load_duration_ms: ms,
            };
        }
        if preload_only {
            return match self.preload_only(model_id).await {
                Ok((family, took)) => LoadModelResponse {
                    success: true,
                    message: format!("{model_id} preloaded ({family} engine), not resident{alias}"),
                    load_duration_ms: millis(took),
                },
                Err(e) => fail(e),
            };
        }
        match self.load_resident(model_id, false).await {
            Ok(took) => {
                let family = self.engine_for(model_id).map_or("?", |e| e.family());
                LoadModelResponse {
                    success: true,
                    message: format!("{model_id} loaded ({family} engine){alias}"),
                    load_duration_ms: millis(took),
                }
            }
            Err(e) => fail(e),
        }
    }

    async fn preload_only(&self, id: &str) -> Result<(&'static str, Duration), ModelError> {
        let (engine, runtime) = {
            let mut st = self.lock();
            let m = st
                .models
                .get_mut(id)
                .ok_or_else(|| ModelError::Unknown(id.to_owned()))?;
            (m.engine.clone(), self.runtime_of(m))
        };
        let started = Instant::now();
        if let Some(rt) = runtime {
            rt.warm_up().await.map_err(|e| ModelError::LoadFailed {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let took = started.elapsed();
        if let Some(m) = self.lock().models.get_mut(id) {
            m.load_duration_ms = millis(took);
        }
        Ok((engine.family(), took))
    }

    /// UnloadModel: evicts `model_id` unless sessions use it.
    pub fn unload(&self, model_id: &str) -> UnloadModelResponse {
        let result = self.try_unload(model_id);
        UnloadModelResponse {
            success: result.is_ok(),
            message: match result {
                Ok(()) => format!("{model_id} unloaded"),
                Err(e) => e.to_string(),
            },
        }
    }

    fn try_unload(&self, id: &str) -> Result<(), ModelError> {
        if id.trim().is_empty() {
            return Err(ModelError::MissingId);
        }
        let id = self.canonical(id)?;
        let id = id.as_str();
        let mut st = self.lock();
        let m = st
            .models
            .get(id)
            .ok_or_else(|| ModelError::Unknown(id.to_owned()))?;
        if !m.resident {
            return Err(ModelError::NotLoaded(id.to_owned()));
        }
        if m.refs > 0 {
            return Err(ModelError::InUse {
                id: id.to_owned(),
                refs: m.refs,
            });
        }
        st.evict(id, false);
        Ok(())
    }

    /// A session starts using `id` (empty: the default): loads it if needed and takes a
    /// reference. Returns the resolved id, which [`ModelManager::release`] must get back.
    pub async fn acquire(&self, id: &str) -> Result<String, ModelError> {
        let id = self.canonical(id)?;
        // A model can be evicted between our load and our reference (TTL tick, cap): retry.
        for _ in 0..3 {
            {
                let mut st = self.lock();
                if let Some(m) = st.models.get_mut(&id).filter(|m| m.resident) {
                    m.refs += 1;
                    m.last_used = Instant::now();
                    return Ok(id);
                }
            }
            self.load_resident(&id, false).await?;
        }
        Err(ModelError::LoadFailed {
            id,
            reason: "evicted while loading (resident cap too small for the load?)".into(),
        })
    }

    /// A session stops using `id`.
    pub fn release(&self, id: &str) {
        if let Some(m) = self.lock().models.get_mut(id) {
            m.refs = m.refs.saturating_sub(1);
            m.last_used = Instant::now();
        }
    }

    /// The engine a synthesis of `id` uses; marks the model as just used.
    pub fn handle(&self, id: &str) -> Result<EngineHandle, ModelError> {
        let id = self.canonical(id)?;
        let mut st = self.lock();
        let m = st
            .models
            .get_mut(&id)
            .ok_or(ModelError::Unknown(id.clone()))?;
        m.last_used = Instant::now();
        Ok(match self.runtime_of(m) {
            Some(rt) => EngineHandle::Espeak(rt),
            None => EngineHandle::Mock,
        })
    }

    /// Evicts every unpinned, unused model idle for at least the TTL at `now`. Returns the
    /// evicted ids.
    pub fn evict_idle(&self, now: Instant) -> Vec<String> {
        let Some(ttl) = self.config.ttl else {
            return Vec::new();
        };
        let mut st = self.lock();
        let idle: Vec<String> = st
            .models
            .iter()
            .filter(|(_, m)| {
                m.resident
                    && !m.pinned
                    && m.refs == 0
                    && now.saturating_duration_since(m.last_used) >= ttl
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in &idle {
            st.evict(id, true);
        }
        idle
    }

    /// How often the worker should call [`ModelManager::evict_idle`]: a quarter of the TTL,
    /// between 50 ms and 10 s (`None` without a TTL).
    pub fn eviction_interval(&self) -> Option<Duration> {
        self.config
            .ttl
            .map(|t| (t / 4).clamp(Duration::from_millis(50), Duration::from_secs(10)))
    }

    /// Every known model, loaded or not, sorted by id.
    pub fn list(&self) -> Vec<ModelInfo> {
        let now = Instant::now();
        let st = self.lock();
        st.models
            .iter()
            .map(|(id, m)| self.model_info(id, m, now))
            .collect()
    }

    fn model_info(&self, id: &str, m: &Model, now: Instant) -> ModelInfo {
        let mut metadata = HashMap::from([
            ("engine".to_owned(), m.engine.family().to_owned()),
            ("sessions".to_owned(), m.refs.to_string()),
            ("pinned".to_owned(), m.pinned.to_string()),
            (
                "load_duration_ms".to_owned(),
                m.load_duration_ms.to_string(),
            ),
            ("loads".to_owned(), m.loads.to_string()),
            (
                "idle_ms".to_owned(),
                millis(now.saturating_duration_since(m.last_used)).to_string(),
            ),
        ]);
        match &m.engine {
            Engine::Mock => {
                metadata.insert(
                    "frequency_hz".to_owned(),
                    super::mock::FREQUENCY_HZ.to_string(),
                );
            }
            Engine::Espeak(v) => {
                metadata.insert("voice".to_owned(), v.name.clone());
                metadata.insert("voice_file".to_owned(), v.file.clone());
                if let Some(e) = &self.espeak {
                    metadata.insert("espeak_version".to_owned(), e.version().to_owned());
                }
            }
        }
        ModelInfo {
            model_id: id.to_owned(),
            family: m.engine.family().to_owned(),
            is_loaded: m.resident,
            languages: m.engine.languages(),
            metadata,
        }
    }

    /// Ids of the resident models, sorted.
    pub fn resident(&self) -> Vec<String> {
        self.lock()
            .models
            .iter()
            .filter(|(_, m)| m.resident)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Every language some known model speaks, sorted (GetCapabilities).
    pub fn languages(&self) -> Vec<String> {
        let st = self.lock();
        let set: BTreeSet<String> = st
            .models
            .values()
            .flat_map(|m| m.engine.languages())
            .collect();
        set.into_iter().collect()
    }

    /// Lifecycle counters for GetCapabilities' metrics.
    pub fn metrics(&self) -> [(&'static str, f64); 4] {
        let st = self.lock();
        [
            ("resident_models", st.resident_count() as f64),
            ("max_resident_models", self.config.max_resident as f64),
            ("model_loads_total", st.loads_total as f64),
            ("model_evictions_total", st.evictions_total as f64),
        ]
    }

    /// Sessions holding `id` (0 for unknown ids).
    pub fn refs(&self, id: &str) -> usize {
        self.lock().models.get(id).map_or(0, |m| m.refs)
    }

    /// A manager whose catalogue also has mock-engine entries `ids`: the lifecycle rules
    /// (LRU, TTL, pins) need several models, and without espeak-ng the real catalogue has one.
    #[cfg(test)]
    fn with_test_models(config: ManagerConfig, ids: &[&str]) -> ModelManager {
        let m = ModelManager::new(config, None);
        for id in ids {
            m.lock()
                .models
                .insert((*id).to_owned(), Model::new(Engine::Mock));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lifecycle tests' catalogue: the mock plus mock-engine entries standing in for
    /// voices (see [`ModelManager::with_test_models`]).
    const EXTRA: &[&str] = &["m-1", "m-2", "m-3", "m-4", "m-fast", "m-p", "m-q"];

    fn manager(config: ManagerConfig) -> ModelManager {
        ModelManager::with_test_models(config, EXTRA)
    }

    async fn started(config: ManagerConfig) -> ModelManager {
        let m = manager(config);
        m.start().await.unwrap();
        m
    }

    #[tokio::test]
    async fn default_model_is_resident_and_pinned() {
        let m = ModelManager::new(ManagerConfig::default(), None);
        m.start().await.unwrap();
        assert_eq!(m.resident(), vec![DEFAULT_MODEL.to_owned()]);
        let list = m.list();
        assert_eq!(list.len(), 1);
        assert!(list[0].is_loaded);
        assert_eq!(list[0].family, "mock");
        assert_eq!(list[0].languages, vec!["en".to_owned()]);
        assert_eq!(list[0].metadata["pinned"], "true");
        assert_eq!(m.languages(), vec!["en".to_owned()]);
        assert!(m
            .evict_idle(Instant::now() + Duration::from_secs(1 << 20))
            .is_empty());
    }

    #[tokio::test]
    async fn client_ids_never_grow_the_catalogue() {
        let m = ModelManager::new(ManagerConfig::default(), None);
        m.start().await.unwrap();
        // Aliases of the one mock model: same entry, same references.
        for alias in ["mock-x", "mock", "mock-fast", "mockingbird"] {
            assert_eq!(m.acquire(alias).await.unwrap(), MOCK_MODEL);
        }
        assert_eq!(m.refs(MOCK_MODEL), 4);
        let r = m.load("mock-special", false).await;
        assert!(
            r.success && r.message.contains("alias of mock-440hz"),
            "{r:?}"
        );
        // Unknown ids are refused, long ones without echoing them.
        let e = m.acquire("piper-en-us").await.unwrap_err();
        assert!(
            e.to_string().starts_with("unknown model \"piper-en-us\""),
            "{e}"
        );
        assert!(!m.load("piper-en-us", false).await.success);
        assert!(!m.load("piper-en-us", true).await.success);
        let long = "x".repeat(MAX_MODEL_ID_BYTES + 1);
        let e = m.acquire(&long).await.unwrap_err();
        assert_eq!(e, ModelError::TooLong(129));
        assert!(!e.to_string().contains("xxx"));
        let long_mock = format!("mock-{}", "y".repeat(200));
        assert_eq!(m.acquire(&long_mock).await, Err(ModelError::TooLong(205)));
        assert_eq!(m.list().len(), 1, "still only the catalogue");
        assert_eq!(m.resident(), vec![MOCK_MODEL.to_owned()]);
    }

    #[tokio::test]
    async fn mock_any_model_maps_unknown_ids_to_the_one_mock() {
        let m = ModelManager::new(
            ManagerConfig {
                mock_any_model: true,
                ..ManagerConfig::default()
            },
            None,
        );
        m.start().await.unwrap();
        assert_eq!(m.acquire("piper-en-us").await.unwrap(), MOCK_MODEL);
        assert_eq!(m.engine_for("xtts"), Ok(Engine::Mock));
        // espeak ids stay errors: a sine would hide a typo.
        assert!(m.acquire("espeak-en-us").await.is_err());
        assert!(m.acquire(&"z".repeat(129)).await.is_err());
        assert_eq!(m.list().len(), 1);
    }

    #[tokio::test]
    async fn load_unload_cycle() {
        let m = started(ManagerConfig::default()).await;
        let r = m.load("m-fast", false).await;
        assert!(r.success, "{}", r.message);
        assert!(r.load_duration_ms >= 0);
        assert_eq!(
            m.resident(),
            vec!["m-fast".to_owned(), "mock-440hz".to_owned()]
        );
        assert!(m.load("m-fast", false).await.success); // already loaded: still fine
        assert!(m.unload("m-fast").success);
        let again = m.unload("m-fast");
        assert!(!again.success);
        assert!(again.message.contains("not loaded"));
        assert_eq!(m.list().len(), 1 + EXTRA.len()); // still catalogued
        assert!(!m.unload("never-seen").success);
        assert!(!m.load("", false).await.success);
        assert_eq!(m.metrics()[3], ("model_evictions_total", 0.0));
    }

    #[tokio::test]
    async fn preload_only_does_not_make_resident() {
        let m = started(ManagerConfig::default()).await;
        assert!(m.load("m-1", true).await.success);
        assert_eq!(m.resident(), vec![DEFAULT_MODEL.to_owned()]);
        let info = m.list().into_iter().find(|i| i.model_id == "m-1").unwrap();
        assert!(!info.is_loaded);
    }

    #[tokio::test]
    async fn ids_choose_their_engine() {
        let m = ModelManager::new(ManagerConfig::default(), None);
        assert_eq!(m.engine_for("mock-440hz"), Ok(Engine::Mock));
        assert_eq!(m.engine_for("mock-other"), Ok(Engine::Mock));
        assert_eq!(
            m.engine_for("piper-en-us"),
            Err(ModelError::Unknown("piper-en-us".into()))
        );
        assert_eq!(m.engine_for(" "), Err(ModelError::MissingId));
        let e = m.engine_for("espeak-en-us").unwrap_err();
        assert!(e.to_string().contains("apt-get install espeak-ng"), "{e}");
        assert_eq!(m.canonical("").unwrap(), DEFAULT_MODEL);
        assert!(matches!(m.handle(""), Ok(EngineHandle::Mock)));
    }

    #[tokio::test]
    async fn references_block_unload_and_eviction() {
        let m = started(ManagerConfig {
            ttl: Some(Duration::from_secs(10)),
            ..ManagerConfig::default()
        })
        .await;
        assert_eq!(m.acquire("m-1").await.unwrap(), "m-1");
        assert_eq!(m.acquire("m-1").await.unwrap(), "m-1");
        assert_eq!(m.refs("m-1"), 2);
        let r = m.unload("m-1");
        assert!(!r.success);
        assert!(r.message.contains("in use by 2"), "{}", r.message);
        let later = Instant::now() + Duration::from_secs(60);
        assert!(m.evict_idle(later).is_empty(), "in use: not evicted");
        m.release("m-1");
        assert!(m.evict_idle(later).is_empty(), "still one reference");
        m.release("m-1");
        assert_eq!(m.refs("m-1"), 0);
        assert!(
            m.evict_idle(Instant::now()).is_empty(),
            "not idle long enough yet"
        );
        assert_eq!(m.evict_idle(later), vec!["m-1".to_owned()]);
        assert_eq!(
            m.resident(),
            vec![DEFAULT_MODEL.to_owned()],
            "default is pinned"
        );
        assert_eq!(m.metrics()[3], ("model_evictions_total", 1.0));
        // acquire of an evicted model loads it again.
        assert_eq!(m.acquire("m-1").await.unwrap(), "m-1");
        assert!(m.resident().contains(&"m-1".to_owned()));
        assert_eq!(m.acquire("").await.unwrap(), DEFAULT_MODEL);
    }

    #[tokio::test]
    async fn the_cap_evicts_the_least_recently_used_idle_model() {
        let m = started(ManagerConfig {
            max_resident: 3,
            ..ManagerConfig::default()
        })
        .await;
        assert!(m.load("m-1", false).await.success);
        assert!(m.load("m-2", false).await.success);
        // Touch m-1 so m-2 is the least recently used.
        assert!(m.load("m-1", false).await.success);
        assert!(m.load("m-3", false).await.success);
        assert_eq!(
            m.resident(),
            vec!["m-1", "m-3", "mock-440hz"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        );
        // With every slot in use or pinned, a load fails with a clear reason.
        m.acquire("m-1").await.unwrap();
        m.acquire("m-3").await.unwrap();
        let r = m.load("m-4", false).await;
        assert!(!r.success);
        assert!(r.message.contains("--max-resident-models"), "{}", r.message);
        assert_eq!(m.resident().len(), 3);
    }

    #[tokio::test]
    async fn preloads_are_pinned_and_ttl_can_be_off() {
        let m = started(ManagerConfig {
            preload: vec!["m-p".into()],
            ttl: None,
            ..ManagerConfig::default()
        })
        .await;
        assert_eq!(m.resident().len(), 2);
        assert_eq!(m.eviction_interval(), None);
        assert!(m.load("m-q", false).await.success);
        assert!(m
            .evict_idle(Instant::now() + Duration::from_secs(1 << 20))
            .is_empty());
        let info = m.list().into_iter().find(|i| i.model_id == "m-p").unwrap();
        assert_eq!(info.metadata["pinned"], "true");
        assert!(m.unload("m-p").success, "explicit unload still works");
    }

    #[tokio::test]
    async fn a_default_espeak_model_without_espeak_fails_to_start() {
        let m = ModelManager::new(
            ManagerConfig {
                default_model: "espeak-en-us".into(),
                ..ManagerConfig::default()
            },
            None,
        );
        let e = m.start().await.unwrap_err();
        assert_eq!(e, ModelError::EngineMissing("espeak-en-us".into()));
    }
}
