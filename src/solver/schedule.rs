//! The scheduler's state: which stages are ready, how many threads run them, the first
//! failure, and which step keys are being computed right now. It is a value the solver owns,
//! never a process-global, and knows nothing of what a stage or a step does, so it is tested
//! here with plain closures.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Condvar, Mutex};

/// Which stages are done, how many run, and the first failure.
struct Queue<E> {
    /// Stages whose inputs are all done, in build order.
    ready: VecDeque<usize>,
    /// For each stage, how many of its inputs are not done yet.
    waiting: BTreeMap<usize, usize>,
    /// For each stage, the stages that read it.
    dependents: BTreeMap<usize, Vec<usize>>,
    /// Stages not finished yet.
    left: usize,
    failed: Option<E>,
}

/// Run every stage of `stages` (each with the stages it reads; ones not listed are taken as
/// done) as soon as those it reads are done, on at most `jobs` threads that take ready stages
/// from one queue (a thread per stage would wake every waiting stage on each completion:
/// quadratic in the stage count). After the first failure no stage starts; that failure is
/// returned once the running ones end.
pub fn run_stages<E: Send>(
    stages: &[(usize, Vec<usize>)],
    jobs: usize,
    run: impl Fn(usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let listed: BTreeSet<usize> = stages.iter().map(|(i, _)| *i).collect();
    let mut queue = Queue {
        ready: VecDeque::new(),
        waiting: BTreeMap::new(),
        dependents: BTreeMap::new(),
        left: stages.len(),
        failed: None,
    };
    for (stage, deps) in stages {
        let deps: BTreeSet<usize> = deps
            .iter()
            .copied()
            .filter(|d| listed.contains(d))
            .collect();
        for d in &deps {
            queue.dependents.entry(*d).or_default().push(*stage);
        }
        if deps.is_empty() {
            queue.ready.push_back(*stage);
        }
        queue.waiting.insert(*stage, deps.len());
    }
    let queue = Mutex::new(queue);
    let wake = Condvar::new();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(stages.len().max(1)) {
            let (queue, wake, run) = (&queue, &wake, &run);
            s.spawn(move || loop {
                let Ok(mut q) = queue.lock() else { return };
                let stage = loop {
                    if q.failed.is_some() || q.left == 0 {
                        return;
                    }
                    if let Some(i) = q.ready.pop_front() {
                        break i;
                    }
                    q = match wake.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                };
                drop(q);
                let outcome = run(stage);
                let Ok(mut q) = queue.lock() else { return };
                q.left -= 1;
                match outcome {
                    Ok(()) => {
                        for d in q.dependents.remove(&stage).unwrap_or_default() {
                            if let Some(n) = q.waiting.get_mut(&d) {
                                *n -= 1;
                                if *n == 0 {
                                    q.ready.push_back(d);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        if q.failed.is_none() {
                            q.failed = Some(e);
                        }
                    }
                }
                wake.notify_all();
            });
        }
    });
    match queue.into_inner() {
        Ok(q) => q.failed.map_or(Ok(()), Err),
        Err(p) => p.into_inner().failed.map_or(Ok(()), Err),
    }
}

/// Step keys being computed right now, whichever build computes them (the platforms of one
/// build run side by side, sharing one solver): an identical step elsewhere waits for it,
/// then takes its result from the cache.
#[derive(Default)]
pub struct InFlight {
    running: Mutex<BTreeSet<String>>,
    done: Condvar,
}

/// What [`InFlight::claim`] found.
pub enum Claim<'a, H> {
    /// The result was there (perhaps after waiting for whoever computed it).
    Hit(H),
    /// The caller computes it; others wait until this is dropped.
    Run(Held<'a>),
}

/// A claimed key, released when dropped (whether the step succeeded or not).
pub struct Held<'a> {
    owner: Option<(&'a InFlight, String)>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some((flight, key)) = self.owner.take() {
            if let Ok(mut running) = flight.running.lock() {
                running.remove(&key);
            }
            flight.done.notify_all();
        }
    }
}

impl InFlight {
    /// `lookup`'s result for `key`, or the claim to compute it. While another holder computes
    /// the same key, this waits, then looks up again.
    pub fn claim<H>(&self, key: &str, lookup: impl Fn() -> Option<H>) -> Claim<'_, H> {
        let Ok(mut running) = self.running.lock() else {
            // A thread panicked with the lock held: no dedupe, but still a correct build.
            return lookup().map_or(Claim::Run(Held { owner: None }), Claim::Hit);
        };
        loop {
            if let Some(hit) = lookup() {
                return Claim::Hit(hit);
            }
            if !running.contains(key) {
                running.insert(key.to_string());
                return Claim::Run(Held {
                    owner: Some((self, key.to_string())),
                });
            }
            running = match self.done.wait(running) {
                Ok(r) => r,
                Err(_) => return Claim::Run(Held { owner: None }),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_stage_starts_after_the_stages_it_reads() {
        // 0 <- 1 <- 3, 0 <- 2 <- 3, and 4 reads a stage that is not in the build.
        let stages = vec![
            (0, vec![]),
            (1, vec![0]),
            (2, vec![0]),
            (3, vec![1, 2]),
            (4, vec![9]),
        ];
        let finished = Mutex::new(Vec::new());
        let r: Result<(), String> = run_stages(&stages, 2, |i| {
            let done = finished.lock().unwrap().clone();
            let deps = &stages.iter().find(|(s, _)| *s == i).unwrap().1;
            for d in deps.iter().filter(|d| **d != 9) {
                assert!(done.contains(d), "stage {i} ran before {d}: {done:?}");
            }
            finished.lock().unwrap().push(i);
            Ok(())
        });
        assert!(r.is_ok());
        let mut all = finished.into_inner().unwrap();
        all.sort();
        assert_eq!(all, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn independent_stages_run_at_the_same_time() {
        // Each of the two stages waits for the other's message: with one thread at a time
        // this would time out.
        let (to_a, from_b) = mpsc::channel::<()>();
        let (to_b, from_a) = mpsc::channel::<()>();
        let (to_a, to_b) = (Mutex::new(to_a), Mutex::new(to_b));
        let (from_a, from_b) = (Mutex::new(from_a), Mutex::new(from_b));
        let r = run_stages(&[(0, vec![]), (1, vec![])], 2, |i| {
            let (send, recv) = if i == 0 {
                (&to_b, &from_b)
            } else {
                (&to_a, &from_a)
            };
            send.lock().unwrap().send(()).unwrap();
            recv.lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30))
                .map_err(|_| format!("stage {i} never met the other"))
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn the_first_failure_stops_what_depends_on_it() {
        let ran = Mutex::new(Vec::new());
        let r = run_stages(&[(0, vec![]), (1, vec![0]), (2, vec![1])], 4, |i| {
            ran.lock().unwrap().push(i);
            if i == 1 {
                Err(format!("stage {i} failed"))
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("stage 1 failed".to_string()));
        assert_eq!(ran.into_inner().unwrap(), [0, 1]);
    }

    #[test]
    fn an_identical_step_waits_for_the_one_running_then_hits() {
        let flight = InFlight::default();
        let cache: Mutex<Option<u32>> = Mutex::new(None);
        let computed = AtomicUsize::new(0);
        let hits = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| match flight.claim("key", || *cache.lock().unwrap()) {
                    Claim::Hit(v) => {
                        assert_eq!(v, 42);
                        hits.fetch_add(1, Ordering::SeqCst);
                    }
                    Claim::Run(_held) => {
                        computed.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        *cache.lock().unwrap() = Some(42);
                    }
                });
            }
        });
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failed_claim_lets_the_next_one_run() {
        let flight = InFlight::default();
        match flight.claim::<()>("key", || None) {
            Claim::Run(held) => drop(held),
            Claim::Hit(_) => panic!("nothing was cached"),
        }
        assert!(matches!(flight.claim::<()>("key", || None), Claim::Run(_)));
    }
}
