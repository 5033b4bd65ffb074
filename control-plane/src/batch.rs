//! Group commit: the writes of many concurrent requests in one transaction (one fsync).
//!
//! A writer task owns a bounded queue; [`collect`] takes the first queued job (waiting for
//! it) and every job already queued behind it, up to a size, then the writer runs them
//! together and answers each. Idle, a job is a batch of its own; under load one batch
//! carries hundreds.

use tokio::sync::mpsc;

/// Times [`collect`] lets other tasks run while collecting a batch, as long as each time
/// brings new jobs (a few microseconds each; it keeps batches from splitting in two).
pub const COLLECT_ROUNDS_MAX: usize = 4;

/// The next batch: the first job, then queued jobs while their total `size` is below
/// `max` (a single job larger than `max` is a batch alone). `None` once every sender is
/// gone and the queue is empty.
pub async fn collect<T>(receiver: &mut mpsc::Receiver<T>, max: usize, size: impl Fn(&T) -> usize) -> Option<Vec<T>> {
    let first = receiver.recv().await?;
    let mut total = size(&first);
    let mut jobs = vec![first];
    let mut rounds = 0;
    loop {
        while total < max {
            match receiver.try_recv() {
                Ok(job) => {
                    total += size(&job);
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        if total >= max || rounds == COLLECT_ROUNDS_MAX {
            return Some(jobs);
        }
        // Callers the previous batch just answered are ready to queue their next
        // request: let them run once, and take what they queued.
        rounds += 1;
        tokio::task::yield_now().await;
        if receiver.is_empty() {
            return Some(jobs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_its_size() {
        let (sender, mut receiver) = mpsc::channel(16);
        for size in [3, 4, 2, 5, 1] {
            sender.send(size).await.unwrap();
        }
        // 3 + 4 + 2 reaches 9 ≥ 8: the batch stops there.
        assert_eq!(collect(&mut receiver, 8, |size| *size).await.unwrap(), [3, 4, 2]);
        assert_eq!(collect(&mut receiver, 8, |size| *size).await.unwrap(), [5, 1]);
        // A job larger than the maximum is a batch alone.
        sender.send(20).await.unwrap();
        sender.send(1).await.unwrap();
        assert_eq!(collect(&mut receiver, 8, |size| *size).await.unwrap(), [20]);
        assert_eq!(collect(&mut receiver, 8, |size| *size).await.unwrap(), [1]);
        drop(sender);
        assert!(collect(&mut receiver, 8, |size: &usize| *size).await.is_none());
    }
}
