//! Chaos on one node: clients that hang up mid-request, retry at once on the same upload and
//! race their own retries, while the server is killed with SIGKILL and restarted. Whatever
//! happened, the run ends with the full check: every stored blob hashes to its name, and every
//! tag resolves to a complete image served in bytes that hash to their digests. (The same on
//! two nodes over PostgreSQL and S3 is in `multinode`.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::TestApp;
use crate::support::chaos::ChaosClient;
use crate::support::check::{assert_blob_files_match_their_names, assert_every_tag_is_complete};

#[test]
fn kill9_dropped_connections_and_racing_retries_leave_everything_consistent() {
    let mut app = TestApp::start();
    let base = app.base.clone();
    let done = AtomicBool::new(false);
    let pushed = std::thread::scope(|s| {
        let workers: Vec<_> = (0..3u64)
            .map(|w| {
                let base = base.clone();
                let done = &done;
                s.spawn(move || {
                    let mut client = ChaosClient::new(vec![base], 1000 + w);
                    let mut pushed = Vec::new();
                    let mut i = 0u64;
                    while !done.load(Ordering::Relaxed) || i < 4 {
                        let repo = format!("chaos/w{w}");
                        let tag = format!("t{}", i % 5);
                        let digest = client.push_image(&repo, &tag, w * 10_000 + i);
                        pushed.push((repo, tag, digest));
                        i += 1;
                    }
                    pushed
                })
            })
            .collect();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1500));
            app.restart(); // SIGKILL, then start again on the same address and data
        }
        std::thread::sleep(Duration::from_millis(1500));
        done.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|_| panic!("worker panicked")))
            .collect::<Vec<_>>()
    });
    eprintln!("{} pushes completed through 3 crashes", pushed.len());
    assert!(pushed.len() >= 12, "only {} pushes completed", pushed.len());
    // Late writes of dropped requests have had every chance to land.
    std::thread::sleep(Duration::from_millis(500));
    assert_blob_files_match_their_names(&app.data_dir);
    assert_every_tag_is_complete(&app);
    // And after one more crash, nothing acknowledged is lost.
    app.restart();
    for (repo, tag, _) in &pushed {
        app.get(&format!("/v2/{repo}/manifests/{tag}"))
            .assert_status(200);
    }
    assert_every_tag_is_complete(&app);
}
