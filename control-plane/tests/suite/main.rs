//! Storage and HTTP tests, written once and run against both backends: SQLite in a temp
//! dir and PostgreSQL on this machine (a fresh database per test). The PostgreSQL tests
//! never skip: if the server is unreachable they fail and say so.

mod api;
mod ca;
mod cards;
mod edge_map;
mod enrollment;
mod fixture;
mod grpc;
mod hsm_ca;
mod keys;
mod ledger;
mod registry;
mod replicas;
mod search;
mod storage;

/// Generates one `#[tokio::test]` per backend for each `async fn(&Fixture)` named.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = crate::fixture::Fixture::sqlite().await;
                    super::$name(&fixture).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = crate::fixture::Fixture::postgres().await;
                    super::$name(&fixture).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
