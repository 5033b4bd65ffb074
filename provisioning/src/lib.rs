//! Molt edge provisioning: `molt-provision`.
//!
//! `enroll` provisions one device: it is [`molt_edge::enroll`] with the key in a file or in
//! the device's PKCS#11 token, safe to re-run. `batch` provisions a fleet from a file
//! ([`batch::BatchFile`]): for each device it creates an enrollment token through the
//! control plane's admin API, enrolls, and records the outcome; one failing device does
//! not stop the others, and the summary names each failure.
#![forbid(unsafe_code)]

pub mod batch;
