//! Registry search at scale: loads a synthetic registry (1,000,000 agents by default)
//! into SQLite and PostgreSQL, then measures capability listings by trust, ranked full
//! text and typo-tolerant name queries, one client at a time (latency) and several at
//! once (throughput). Prints the figures; it asserts nothing about time.
//!
//! ```text
//! cargo bench -p molt-control-plane --bench registry_search -- [--agents N] [--queries N]
//!     [--concurrency N] [--backend sqlite|postgres|both] [--postgres-url URL]
//! ```
//!
//! The data is generated from a fixed seed: 5,000 words, names of two words, descriptions
//! of eight, two capabilities of 400 with two tags of 120 each; words, capabilities and
//! tags are drawn with a skew toward the common ones, as real vocabularies are. Trust
//! is uniform in [0, 1]; heartbeats are spread over the last 30 minutes, so agents are
//! online, degraded and offline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use molt_control_plane::db::{Database, DatabaseOptions};
use molt_control_plane::registry::{self, Capability, ImportedAgent, Profile, SearchIndex, SearchQuery, Visibility};
use molt_protocol::keys::SigningKey;
use molt_protocol::{AgentId, UnixMillis};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sqlx::Connection as _;

const SEED: u64 = 0x6d6f_6c74;
const WORDS: usize = 5_000;
const CAPABILITIES: usize = 400;
const TAGS: usize = 120;
const IMPORT_BATCH: usize = 2_000;
const PAGE: u32 = 20;
const BENCH_DATABASE: &str = "molt_bench_search";

struct Args {
    agents: usize,
    queries: usize,
    concurrency: usize,
    backends: Vec<&'static str>,
    postgres_url: String,
    /// Measure queries on the PostgreSQL database a previous run loaded.
    reuse: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        agents: 1_000_000,
        queries: 20_000,
        concurrency: 8,
        backends: vec!["sqlite", "postgres"],
        postgres_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        reuse: false,
    };
    let mut input = std::env::args().skip(1);
    while let Some(flag) = input.next() {
        let mut value = || input.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--agents" => args.agents = value().parse().expect("--agents N"),
            "--queries" => args.queries = value().parse().expect("--queries N"),
            "--concurrency" => args.concurrency = value().parse().expect("--concurrency N"),
            "--backend" => {
                args.backends = match value().as_str() {
                    "sqlite" => vec!["sqlite"],
                    "postgres" => vec!["postgres"],
                    "both" => vec!["sqlite", "postgres"],
                    other => panic!("unknown backend {other}"),
                }
            }
            "--postgres-url" => args.postgres_url = value(),
            "--reuse" => args.reuse = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Pronounceable words from syllables; distinct, lower case, 4 to 10 letters.
fn vocabulary(rng: &mut StdRng) -> Vec<String> {
    const ONSETS: &[&str] = &["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "tr", "st"];
    const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ou"];
    let mut seen = std::collections::BTreeSet::new();
    let mut words = Vec::with_capacity(WORDS);
    while words.len() < WORDS {
        let syllables = rng.gen_range(2..=3);
        let word: String = (0..syllables)
            .map(|_| format!("{}{}", ONSETS[rng.gen_range(0..ONSETS.len())], VOWELS[rng.gen_range(0..VOWELS.len())]))
            .collect();
        if (4..=10).contains(&word.len()) && seen.insert(word.clone()) {
            words.push(word);
        }
    }
    words
}

/// An index in `0..n`, skewed toward 0 (common items).
fn skewed(rng: &mut StdRng, n: usize) -> usize {
    let u: f64 = rng.r#gen();
    ((u * u * u) * n as f64) as usize % n
}

struct Dataset {
    words: Vec<String>,
    capabilities: Vec<String>,
}

impl Dataset {
    fn new(rng: &mut StdRng) -> Dataset {
        let words = vocabulary(rng);
        let capabilities = (0..CAPABILITIES).map(|i| format!("{}.{}", words[i], words[i + CAPABILITIES])).collect();
        Dataset { words, capabilities }
    }

    fn word(&self, rng: &mut StdRng) -> &str {
        &self.words[skewed(rng, WORDS)]
    }

    fn tag(&self, rng: &mut StdRng) -> String {
        format!("t{}", skewed(rng, TAGS))
    }

    fn agent(&self, rng: &mut StdRng, now: UnixMillis) -> ImportedAgent {
        let mut seed = [0u8; 32];
        rng.fill(&mut seed);
        let key = SigningKey::from_bytes(&seed).public_key();
        let first = skewed(rng, self.capabilities.len());
        let second = (first + 1 + rng.gen_range(0..self.capabilities.len() - 1)) % self.capabilities.len();
        let capabilities = [first, second]
            .into_iter()
            .map(|index| {
                let mut tags = vec![self.tag(rng), self.tag(rng)];
                tags.sort();
                tags.dedup();
                Capability { name: self.capabilities[index].clone(), version: "1.0.0".into(), tags }
            })
            .collect();
        let description: Vec<&str> = (0..8).map(|_| self.word(rng)).collect();
        let profile = Profile {
            name: format!("{} {}", capitalise(self.word(rng)), self.word(rng)),
            description: description.join(" "),
            capabilities,
            key_binding: None,
            visibility: Visibility::Public,
            home_edge: None,
        };
        ImportedAgent {
            id: AgentId::from_inception_key(&key),
            public_key: key,
            profile,
            trust: rng.gen_range(0.0..=1.0),
            registered_at: UnixMillis(now.0 - 86_400_000),
            last_heartbeat: UnixMillis(now.0 - rng.gen_range(0..30 * 60_000)),
        }
    }

    /// A name word with one random edit (substitution, deletion or insertion).
    fn typo(&self, rng: &mut StdRng) -> String {
        let word: Vec<char> = loop {
            let word = self.word(rng);
            if word.len() >= 5 {
                break word.chars().collect();
            }
        };
        let at = rng.gen_range(1..word.len() - 1);
        let mut out = word.clone();
        match rng.gen_range(0..3) {
            0 => out[at] = if word[at] == 'x' { 'y' } else { 'x' },
            1 => {
                out.remove(at);
            }
            _ => out.insert(at, 'q'),
        }
        out.into_iter().collect()
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Capability,
    Ranked,
    Typo,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Capability => "capability filter by trust",
            Kind::Ranked => "ranked full text (1-2 words)",
            Kind::Typo => "typo-tolerant name (1 edit)",
        }
    }

    fn query(self, dataset: &Dataset, rng: &mut StdRng) -> SearchQuery {
        let base = SearchQuery { limit: PAGE, ..SearchQuery::default() };
        match self {
            Kind::Capability => SearchQuery {
                capability: Some(dataset.capabilities[skewed(rng, dataset.capabilities.len())].clone()),
                ..base
            },
            Kind::Ranked => {
                let words = rng.gen_range(1..=2);
                let text: Vec<&str> = (0..words).map(|_| dataset.word(rng)).collect();
                SearchQuery { text: text.join(" "), ..base }
            }
            Kind::Typo => SearchQuery { text: dataset.typo(rng), ..base },
        }
    }
}

struct Figures {
    queries: usize,
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    empty: usize,
}

async fn run_queries(
    index: &Arc<SearchIndex>,
    dataset: &Arc<Dataset>,
    kind: Kind,
    queries: usize,
    clients: usize,
    now: UnixMillis,
) -> Figures {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let index = Arc::clone(index);
        let dataset = Arc::clone(dataset);
        let share = queries / clients + usize::from(client < queries % clients);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(SEED + 1 + client as u64);
            let mut histogram = Histogram::<u64>::new(3).expect("histogram");
            let mut empty = 0;
            for _ in 0..share {
                let query = kind.query(&dataset, &mut rng);
                let sent = Instant::now();
                let page = index.search(&query, now).await.expect("search");
                histogram.record(sent.elapsed().as_micros() as u64).expect("record");
                empty += usize::from(page.hits.is_empty());
            }
            (histogram, empty)
        }));
    }
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    let mut empty = 0;
    for task in tasks {
        let (part, part_empty) = task.await.expect("client");
        histogram.add(part).expect("merge");
        empty += part_empty;
    }
    let elapsed = started.elapsed();
    Figures {
        queries,
        per_second: queries as f64 / elapsed.as_secs_f64(),
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        empty,
    }
}

async fn open(backend: &str, args: &Args, dir: &std::path::Path) -> Database {
    let url = match backend {
        "sqlite" => format!("sqlite:{}", dir.join("registry.db").display()),
        _ if args.reuse => {
            let base = args.postgres_url.rsplit_once('/').map_or(args.postgres_url.as_str(), |(base, _)| base);
            format!("{base}/{BENCH_DATABASE}")
        }
        _ => {
            let mut connection = sqlx::PgConnection::connect(&args.postgres_url).await.expect("reach PostgreSQL");
            sqlx::query(&format!("DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)"))
                .execute(&mut connection)
                .await
                .expect("drop the bench database");
            sqlx::query(&format!("CREATE DATABASE {BENCH_DATABASE}"))
                .execute(&mut connection)
                .await
                .expect("create the bench database");
            let base = args.postgres_url.rsplit_once('/').map_or(args.postgres_url.as_str(), |(base, _)| base);
            format!("{base}/{BENCH_DATABASE}")
        }
    };
    let options = DatabaseOptions {
        url,
        max_connections: (args.concurrency as u32).max(4),
        acquire_timeout: Duration::from_secs(30),
    };
    Database::connect(&options).await.expect("open the database")
}

async fn bench_backend(backend: &'static str, args: &Args, dataset: &Arc<Dataset>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = open(backend, args, dir.path()).await;
    let now = UnixMillis(1_800_000_000_000);
    println!("\n## {backend}: {} agents", args.agents);

    let mut rng = StdRng::seed_from_u64(SEED);
    if args.reuse {
        println!("(agents loaded by an earlier run)");
        let index = build_index(&db).await;
        measure(&index, dataset, args, now).await;
        db.close().await;
        return;
    }
    // Load: generation runs beside the writes, so the figure is the database's.
    let started = Instant::now();
    let mut loaded = 0;
    let mut generated = Duration::ZERO;
    while loaded < args.agents {
        let count = IMPORT_BATCH.min(args.agents - loaded);
        let generating = Instant::now();
        let batch: Vec<ImportedAgent> = (0..count).map(|_| dataset.agent(&mut rng, now)).collect();
        generated += generating.elapsed();
        registry::import_agents(&db, &batch).await.expect("import");
        loaded += count;
        if loaded % 100_000 == 0 {
            eprintln!("  {backend}: {loaded} agents in {:.1} s", started.elapsed().as_secs_f64());
        }
    }
    let load = started.elapsed() - generated;
    let analyse = Instant::now();
    let statement = if backend == "sqlite" { "ANALYZE" } else { "VACUUM ANALYZE" };
    sqlx::query(statement).execute(db.pool()).await.expect("analyse");
    let analysed = analyse.elapsed();
    println!(
        "load: {:.1} s ({:.0} agents/s), then {statement}: {:.1} s",
        load.as_secs_f64(),
        args.agents as f64 / load.as_secs_f64(),
        analysed.as_secs_f64()
    );

    let index = build_index(&db).await;

    // One registration at a time through the normal path, for comparison; the index
    // takes each with the next search.
    let registrations = 1_000;
    let started = Instant::now();
    for _ in 0..registrations {
        let agent = dataset.agent(&mut rng, now);
        registry::register(&db, agent.id, &agent.public_key, &agent.profile, now).await.expect("register");
    }
    println!("single registrations: {:.0}/s", registrations as f64 / started.elapsed().as_secs_f64());
    let started = Instant::now();
    let refreshed = index.refresh().await.expect("refresh");
    println!("index took {} registrations in {:.1} ms", refreshed.changes, started.elapsed().as_secs_f64() * 1000.0);

    measure(&index, dataset, args, now).await;
    db.close().await;
}

/// Builds a replica's index from the database, as a start does, and reports the time.
async fn build_index(db: &Database) -> Arc<SearchIndex> {
    let index = Arc::new(SearchIndex::new(db.clone()));
    let started = Instant::now();
    let built = index.refresh().await.expect("build the index");
    println!("index build: {} agents in {:.1} s", built.agents, started.elapsed().as_secs_f64());
    index
}

async fn measure(index: &Arc<SearchIndex>, dataset: &Arc<Dataset>, args: &Args, now: UnixMillis) {
    println!("| query | clients | queries | q/s | p50 | p99 | empty pages |");
    println!("|---|---|---|---|---|---|---|");
    for kind in [Kind::Capability, Kind::Ranked, Kind::Typo] {
        // Warm the caches and the statement cache.
        run_queries(index, dataset, kind, 500, args.concurrency, now).await;
        for clients in [1, args.concurrency] {
            let queries = if clients == 1 { args.queries / 4 } else { args.queries };
            let figures = run_queries(index, dataset, kind, queries, clients, now).await;
            println!(
                "| {} | {clients} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
                kind.label(),
                figures.queries,
                figures.per_second,
                figures.p50_us as f64 / 1000.0,
                figures.p99_us as f64 / 1000.0,
                figures.empty
            );
        }
    }
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let dataset = Arc::new(Dataset::new(&mut StdRng::seed_from_u64(SEED)));
    println!(
        "# registry search: {} agents, {} queries per kind, {} clients",
        args.agents, args.queries, args.concurrency
    );
    for backend in args.backends.clone() {
        runtime.block_on(bench_backend(backend, &args, &dataset));
    }
}
