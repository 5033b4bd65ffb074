//! Opening a PKCS#11 module, selecting and logging into a token, and the session pool.
//!
//! A module is loaded and `C_Initialize`d once per process and path: PKCS#11 state is
//! process-wide, so two [`Token`]s of one module share it. Logging in is token-wide too;
//! the pool keeps its sessions open, so the login lasts as long as the [`Token`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use molt_protocol::cert::Serial;

use crate::error::{OpenError, Pkcs11Failure};
use crate::pin::PinSource;

/// Sessions a token opens at most unless told otherwise: one per core is plenty for
/// signing, which holds a session only for the duration of one `C_Sign`.
pub const SESSION_POOL_SIZE_DEFAULT: usize = 4;
/// Upper bound of [`TokenConfig::pool_size`]; modules limit sessions too.
pub const SESSION_POOL_SIZE_MAX: usize = 64;
const _: () = assert!(SESSION_POOL_SIZE_DEFAULT <= SESSION_POOL_SIZE_MAX);

/// Which token of a module to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (must be unique).
    Label(String),
    /// The n-th slot (from 0) among the slots that hold an initialised token.
    SlotIndex(usize),
}

/// Everything needed to open a token.
#[derive(Clone, Debug)]
pub struct TokenConfig {
    /// Path of the PKCS#11 shared library, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    pub token: TokenSelector,
    pub pin: PinSource,
    /// Sessions kept open at most (1 to [`SESSION_POOL_SIZE_MAX`]).
    pub pool_size: usize,
}

/// A logged-in token. Cheap to clone; sessions close (and the login ends) when the last
/// clone and every key taken from it are dropped.
#[derive(Clone, Debug)]
pub struct Token {
    inner: Arc<TokenInner>,
}

#[derive(Debug)]
struct TokenInner {
    module: PathBuf,
    slot: Slot,
    label: String,
    serial_number: String,
    pool: SessionPool,
    /// The module's object-store lock, shared by every token opened through it.
    object_writes: ObjectWrites,
}

/// Serialises the calls that create or destroy token objects within one module, with the
/// lookups and reads a key generation makes.
///
/// SoftHSM2 fails concurrent object creation in one process at random
/// (`CKR_TEMPLATE_INCONSISTENT` or `CKR_GENERAL_ERROR` from `C_GenerateKeyPair`: its file
/// object store races), also when the other thread is only looking objects up. Key
/// creation is rare (CA and edge keys, at ceremonies and renewals), so one lock per loaded
/// module costs nothing that matters; signing and other lookups do not take it.
type ObjectWrites = Arc<Mutex<()>>;

struct LoadedModule {
    path: PathBuf,
    module: Pkcs11,
    object_writes: ObjectWrites,
}

static MODULES: LazyLock<Mutex<Vec<LoadedModule>>> = LazyLock::new(|| Mutex::new(Vec::new()));

/// Loads and initialises `path` once per process.
pub fn load_module(path: &Path) -> Result<Pkcs11, OpenError> {
    load(path).map(|(module, _)| module)
}

fn load(path: &Path) -> Result<(Pkcs11, ObjectWrites), OpenError> {
    if !path.exists() {
        return Err(OpenError::ModuleNotFound { path: path.to_owned() });
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mut modules = lock(&MODULES);
    if let Some(known) = modules.iter().find(|known| known.path == canonical) {
        return Ok((known.module.clone(), known.object_writes.clone()));
    }
    let module = Pkcs11::new(&canonical)
        .map_err(|error| OpenError::ModuleLoad { path: path.to_owned(), detail: error.to_string() })?;
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(error) => return Err(OpenError::Module(Pkcs11Failure::from_cryptoki("C_Initialize", error))),
    }
    let object_writes = ObjectWrites::default();
    modules.push(LoadedModule { path: canonical, module: module.clone(), object_writes: object_writes.clone() });
    Ok((module, object_writes))
}

impl Token {
    /// Loads the module, selects the token, reads the PIN and logs in.
    pub fn open(config: &TokenConfig) -> Result<Token, OpenError> {
        let (module, object_writes) = load(&config.module)?;
        let (slot, label, serial_number) = select_slot(&module, &config.token)?;
        let pin = config.pin.read(&format!("token {label:?}"))?;
        let pin = AuthPin::from(pin.as_str());
        let first = module
            .open_rw_session(slot)
            .map_err(|e| OpenError::Session(Pkcs11Failure::from_cryptoki("C_OpenSession", e)))?;
        match first.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(cryptoki::error::Error::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(OpenError::WrongPin { label });
            }
            Err(cryptoki::error::Error::Pkcs11(RvError::PinLocked, _)) => return Err(OpenError::PinLocked { label }),
            Err(error) => {
                return Err(OpenError::Login { label, failure: Pkcs11Failure::from_cryptoki("C_Login", error) });
            }
        }
        let capacity = config.pool_size.clamp(1, SESSION_POOL_SIZE_MAX);
        let pool = SessionPool::new(module, slot, pin, first, capacity);
        Ok(Token {
            inner: Arc::new(TokenInner {
                module: config.module.clone(),
                slot,
                label,
                serial_number,
                pool,
                object_writes,
            }),
        })
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn serial_number(&self) -> &str {
        &self.inner.serial_number
    }

    pub fn module_path(&self) -> &Path {
        &self.inner.module
    }

    pub fn slot_id(&self) -> u64 {
        self.inner.slot.id()
    }

    /// A session from the pool, waiting while all are in use.
    pub fn session(&self) -> Result<PooledSession<'_>, Pkcs11Failure> {
        self.inner.pool.acquire()
    }

    /// Held while creating or destroying objects: see [`ObjectWrites`].
    pub(crate) fn object_writes(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.object_writes)
    }

    /// Bytes from the token's random generator (`C_GenerateRandom`).
    pub fn random_bytes(&self, len: usize) -> Result<Vec<u8>, Pkcs11Failure> {
        let mut session = self.session()?;
        let mut bytes = vec![0u8; len];
        session.run("C_GenerateRandom", |s| s.generate_random_slice(&mut bytes))?;
        Ok(bytes)
    }

    /// A certificate serial from the token's random generator: positive and nonzero.
    pub fn random_serial(&self) -> Result<Serial, Pkcs11Failure> {
        loop {
            let bytes = self.random_bytes(16)?;
            let mut serial = [0u8; 16];
            serial.copy_from_slice(&bytes);
            serial[0] &= 0x7f;
            if serial != [0u8; 16] {
                return Ok(Serial(serial));
            }
        }
    }
}

/// Labels of every initialised token of a module, in slot order.
pub fn token_labels(module: &Pkcs11) -> Result<Vec<(Slot, String, String)>, Pkcs11Failure> {
    let slots =
        module.get_slots_with_initialized_token().map_err(|e| Pkcs11Failure::from_cryptoki("C_GetSlotList", e))?;
    let mut tokens = Vec::with_capacity(slots.len());
    for slot in slots {
        let info = module.get_token_info(slot).map_err(|e| Pkcs11Failure::from_cryptoki("C_GetTokenInfo", e))?;
        tokens.push((slot, info.label().trim_end().to_owned(), info.serial_number().trim_end().to_owned()));
    }
    Ok(tokens)
}

fn select_slot(module: &Pkcs11, selector: &TokenSelector) -> Result<(Slot, String, String), OpenError> {
    let tokens = token_labels(module).map_err(OpenError::Slot)?;
    match selector {
        TokenSelector::SlotIndex(index) => {
            let count = tokens.len();
            tokens.into_iter().nth(*index).ok_or(OpenError::SlotIndexOutOfRange { index: *index, count })
        }
        TokenSelector::Label(label) => {
            let matching: Vec<_> = tokens.iter().filter(|(_, found, _)| found == label).cloned().collect();
            match matching.len() {
                0 => Err(OpenError::TokenNotFound {
                    label: label.clone(),
                    available: tokens.into_iter().map(|(_, label, _)| label).collect(),
                }),
                1 => Ok(matching.into_iter().next().unwrap_or_else(|| unreachable!("one match"))),
                _ => Err(OpenError::TokenAmbiguous { label: label.clone() }),
            }
        }
    }
}

/// A bounded pool of read-write sessions on one slot. A session is handed to one thread
/// at a time (cryptoki's `Session` is `Send` but not `Sync`).
struct SessionPool {
    module: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    state: Mutex<PoolState>,
    returned: Condvar,
    capacity: usize,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("slot", &self.slot.id())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

struct PoolState {
    idle: Vec<Session>,
    open: usize,
}

impl SessionPool {
    fn new(module: Pkcs11, slot: Slot, pin: AuthPin, first: Session, capacity: usize) -> SessionPool {
        let mut idle = Vec::with_capacity(capacity);
        idle.push(first);
        SessionPool {
            module,
            slot,
            pin,
            state: Mutex::new(PoolState { idle, open: 1 }),
            returned: Condvar::new(),
            capacity,
        }
    }

    fn acquire(&self) -> Result<PooledSession<'_>, Pkcs11Failure> {
        let mut state = lock(&self.state);
        loop {
            if let Some(session) = state.idle.pop() {
                return Ok(PooledSession { pool: self, session: Some(session), dead: false });
            }
            if state.open < self.capacity {
                state.open += 1;
                drop(state);
                return match self.open_session() {
                    Ok(session) => Ok(PooledSession { pool: self, session: Some(session), dead: false }),
                    Err(failure) => {
                        lock(&self.state).open -= 1;
                        self.returned.notify_one();
                        Err(failure)
                    }
                };
            }
            state = self.returned.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Opens a session; logs in again if every earlier session had died (which ends the
    /// login).
    fn open_session(&self) -> Result<Session, Pkcs11Failure> {
        let session =
            self.module.open_rw_session(self.slot).map_err(|e| Pkcs11Failure::from_cryptoki("C_OpenSession", e))?;
        let info = session.get_session_info().map_err(|e| Pkcs11Failure::from_cryptoki("C_GetSessionInfo", e))?;
        if matches!(info.session_state(), SessionState::RoPublic | SessionState::RwPublic) {
            match session.login(UserType::User, Some(&self.pin)) {
                Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(error) => return Err(Pkcs11Failure::from_cryptoki("C_Login", error)),
            }
        }
        Ok(session)
    }

    fn give_back(&self, session: Session, dead: bool) {
        let mut state = lock(&self.state);
        if dead {
            state.open -= 1;
            drop(state);
            drop(session);
        } else {
            state.idle.push(session);
        }
        self.returned.notify_one();
    }
}

/// A session on loan from the pool; goes back on drop (or is closed if it died).
pub struct PooledSession<'p> {
    pool: &'p SessionPool,
    session: Option<Session>,
    dead: bool,
}

impl std::fmt::Debug for PooledSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledSession").field("dead", &self.dead).finish_non_exhaustive()
    }
}

impl PooledSession<'_> {
    /// The raw session.
    pub fn raw(&self) -> &Session {
        // Invariant: `session` is `Some` until drop.
        self.session.as_ref().unwrap_or_else(|| unreachable!("session taken before drop"))
    }

    /// Runs one PKCS#11 call, naming it in the error and retiring the session if the
    /// error means it can no longer be used.
    pub fn run<T>(
        &mut self,
        call: &str,
        operation: impl FnOnce(&Session) -> cryptoki::error::Result<T>,
    ) -> Result<T, Pkcs11Failure> {
        let result = operation(self.raw()).map_err(|error| Pkcs11Failure::from_cryptoki(call, error));
        if result.as_ref().is_err_and(Pkcs11Failure::session_is_dead) {
            self.dead = true;
        }
        result
    }

    /// Marks the session as unusable: it is closed instead of returned.
    pub fn retire(&mut self) {
        self.dead = true;
    }
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.give_back(session, self.dead);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
