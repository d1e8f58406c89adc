//! Forced refreshes and waiters: reports of a bad token, `min_ttl`.

use super::*;

#[tokio::test(start_paused = true)]
async fn fifty_reports_of_the_current_token_cause_one_call_and_an_old_one_none() {
    let source = scripted(Duration::from_secs(900));
    let (handle, _m, _cancel) = start(&source, policy());
    let old = handle.want(MIN).await.unwrap();
    assert_eq!(source.calls(), 1);
    let old_sha = old.sha256;
    let reports: Vec<_> = (0..50)
        .map(|_| {
            let h = handle.clone();
            tokio::spawn(async move { h.invalidate(old_sha, "engine").await })
        })
        .collect();
    let mut fresh = std::collections::HashSet::new();
    for r in reports {
        fresh.insert(r.await.unwrap().expect("a new token").sha256);
    }
    assert_eq!(fresh.len(), 1);
    assert!(!fresh.contains(&old.sha256));
    assert_eq!(source.calls(), 2, "one upstream call for 50 reports");
    let again = handle.invalidate(old.sha256, "engine").await.unwrap();
    assert!(fresh.contains(&again.sha256));
    let unknown = handle.invalidate(token_sha256("never issued"), "engine").await.unwrap();
    assert_eq!(unknown.sha256, again.sha256);
    assert_eq!(source.calls(), 2, "reports of other tokens change nothing");
}

#[tokio::test(start_paused = true)]
async fn forced_refreshes_are_rate_limited_per_consumer_and_a_report_beyond_the_share_keeps_the_token() {
    let source = scripted(Duration::from_secs(900));
    let (handle, _m, _cancel) = start(&source, policy());
    let mut current = handle.want(MIN).await.unwrap();
    for _ in 0..FORCED_REFRESH_BURST {
        current = handle.invalidate(current.sha256, "noisy").await.unwrap();
    }
    assert_eq!(source.calls(), 1 + FORCED_REFRESH_BURST as usize);
    let refused = handle.invalidate(current.sha256, "noisy").await.unwrap_err();
    assert_eq!(refused.cause, Cause::ConsumerShareSpent);
    assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= FORCED_REFRESH_EVERY);
    assert_eq!(source.calls(), 1 + FORCED_REFRESH_BURST as usize);
    // The noisy consumer's refused report left the token for everyone.
    let kept = handle.published().token.clone().expect("still held");
    assert_eq!(kept.sha256, current.sha256);
    assert_eq!(handle.want_as("quiet", MIN).await.unwrap().sha256, current.sha256);
    // Another consumer's own share is untouched: its report is honoured.
    let fresh = handle.invalidate(current.sha256, "quiet").await.unwrap();
    assert_ne!(fresh.sha256, current.sha256);
    assert_eq!(source.calls(), 2 + FORCED_REFRESH_BURST as usize);
    // The noisy one gets another after its share refills.
    tokio::time::sleep(FORCED_REFRESH_EVERY + Duration::from_secs(1)).await;
    assert!(handle.invalidate(fresh.sha256, "noisy").await.is_ok());
    assert_eq!(source.calls(), 3 + FORCED_REFRESH_BURST as usize);
}

#[tokio::test(start_paused = true)]
async fn many_consumers_together_are_held_by_the_accounts_cap() {
    let source = scripted(Duration::from_secs(900));
    let (handle, _m, _cancel) = start(&source, policy());
    let mut current = handle.want(MIN).await.unwrap();
    let mut refused = None;
    for i in 0..(ACCOUNT_FORCED_BURST + 2) {
        match handle.invalidate(current.sha256, &format!("engine-{i}")).await {
            Ok(next) => current = next,
            Err(u) => {
                refused = Some(u);
                break;
            }
        }
    }
    let refused = refused.expect("the account's cap holds");
    assert_eq!(refused.cause, Cause::ForcedRefreshLimited);
    assert_eq!(source.calls(), 1 + ACCOUNT_FORCED_BURST as usize);
}

#[tokio::test(start_paused = true)]
async fn min_ttl_above_what_is_held_refreshes_and_beyond_a_lifetime_is_refused() {
    let source = scripted(Duration::from_secs(900));
    let (handle, _m, _cancel) = start(&source, policy());
    let first = handle.want(MIN).await.unwrap();
    tokio::time::sleep(Duration::from_secs(100)).await;
    let second = handle.want(Duration::from_secs(850)).await.unwrap();
    assert_ne!(first.sha256, second.sha256);
    assert!(second.remaining(Instant::now()) >= Duration::from_secs(850));
    let refused = handle.want(Duration::from_secs(901)).await.unwrap_err();
    assert_eq!(
        refused.cause,
        Cause::Unsatisfiable {
            lifetime: Duration::from_secs(900)
        }
    );
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_need_that_even_a_fresh_token_cannot_meet_is_unsatisfiable_not_a_timeout() {
    let source = scripted(Duration::from_secs(30));
    let short = RefreshPolicy {
        refresh_before_expiry: Duration::from_secs(10),
        min_served_ttl: Duration::from_secs(5),
        jitter: Duration::ZERO,
        ..policy()
    };
    let (handle, _m, _cancel) = start(&source, short);
    handle.want(Duration::from_secs(1)).await.unwrap();
    // The call takes 50 ms, counted against the token: 29.95 s is the most.
    let refused = handle.want(Duration::from_millis(29_990)).await.unwrap_err();
    let Cause::Unsatisfiable { lifetime } = refused.cause else {
        panic!("{refused:?}");
    };
    assert!(lifetime < Duration::from_millis(29_990) && lifetime >= Duration::from_millis(29_900));
    assert_eq!(source.calls(), 2);
}
