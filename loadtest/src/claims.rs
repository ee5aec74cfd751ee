//! Claim-statement latency from the workers' own histogram (`tally_claim_duration_seconds`),
//! scraped every 10 s: the soak's "claim p99 at the end against the start".

/// Cumulative buckets of one scrape: (upper bound in seconds, count), ascending, ending at +Inf.
pub type Buckets = Vec<(f64, f64)>;

/// (seconds since the start, worker metrics URL, that worker's cumulative buckets).
pub type ClaimSample = (f64, String, Buckets);

/// The claim histogram's buckets from a Prometheus text exposition.
pub fn parse(text: &str) -> Buckets {
    let mut out: Buckets = text
        .lines()
        .filter_map(|l| l.strip_prefix("tally_claim_duration_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, value) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The claims observed between `from` and `to` seconds, summed over workers: per worker,
/// its last scrape at or before `to` minus its last scrape at or before `from` (a worker that
/// restarted in between, whose counters went down, is left out).
pub fn window(samples: &[ClaimSample], from: f64, to: f64) -> Buckets {
    let mut urls: Vec<&str> = samples.iter().map(|s| s.1.as_str()).collect();
    urls.sort_unstable();
    urls.dedup();
    let mut sum: Buckets = Vec::new();
    for url in urls {
        let last_at = |t: f64| {
            samples
                .iter()
                .filter(|s| s.1 == url && s.0 <= t)
                .max_by(|a, b| a.0.total_cmp(&b.0))
        };
        let Some(end) = last_at(to) else { continue };
        let start = last_at(from).filter(|s| s.0 < end.0);
        let delta: Buckets = match start {
            Some(start) if start.2.len() == end.2.len() => start
                .2
                .iter()
                .zip(&end.2)
                .map(|(a, b)| (b.0, b.1 - a.1))
                .collect(),
            Some(_) => continue,
            // No scrape before `from`: the worker started inside the window.
            None if from <= 0.0 => end.2.clone(),
            None => continue,
        };
        if delta.iter().any(|b| b.1 < 0.0) {
            continue;
        }
        if sum.is_empty() {
            sum = delta;
        } else if sum.len() == delta.len() {
            for (s, d) in sum.iter_mut().zip(delta) {
                s.1 += d.1;
            }
        }
    }
    sum
}

/// The q-quantile (0..1) in milliseconds, interpolated inside its bucket the way Prometheus'
/// `histogram_quantile` does; None without observations.
pub fn quantile_ms(buckets: &Buckets, q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower * 1000.0);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some((lower + (le - lower) * frac) * 1000.0);
        }
        (lower, below) = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP tally_claim_duration_seconds Duration of one claim statement.\n\
        # TYPE tally_claim_duration_seconds histogram\n\
        tally_claim_duration_seconds_bucket{le=\"0.001\"} 50\n\
        tally_claim_duration_seconds_bucket{le=\"0.002\"} 90\n\
        tally_claim_duration_seconds_bucket{le=\"0.004\"} 100\n\
        tally_claim_duration_seconds_bucket{le=\"+Inf\"} 100\n\
        tally_claim_duration_seconds_sum 0.12\n\
        tally_claim_duration_seconds_count 100\n\
        tally_claim_batch_size_bucket{le=\"1\"} 7\n";

    #[test]
    fn parses_only_the_claim_buckets_and_interpolates_like_prometheus() {
        let b = parse(TEXT);
        assert_eq!(b.len(), 4);
        assert_eq!(b[3], (f64::INFINITY, 100.0));
        // p50 is the top of the first bucket; p99 lies 90 % into (2 ms, 4 ms].
        assert!((quantile_ms(&b, 0.5).unwrap() - 1.0).abs() < 1e-9);
        assert!((quantile_ms(&b, 0.99).unwrap() - 3.8).abs() < 1e-9);
        assert_eq!(quantile_ms(&parse(""), 0.99), None);
    }

    #[test]
    fn a_window_is_the_difference_of_scrapes_summed_over_workers() {
        let at = |n: [f64; 4]| -> Buckets {
            [0.001, 0.002, 0.004, f64::INFINITY]
                .into_iter()
                .zip(n)
                .collect()
        };
        let samples = vec![
            (0.0, "a".to_owned(), at([0.0, 0.0, 0.0, 0.0])),
            (10.0, "a".to_owned(), at([100.0, 100.0, 100.0, 100.0])),
            (20.0, "a".to_owned(), at([100.0, 100.0, 200.0, 200.0])),
            (10.0, "b".to_owned(), at([5.0, 5.0, 5.0, 5.0])),
            // b restarted: its counters went down, so it is left out of (10, 20].
            (20.0, "b".to_owned(), at([1.0, 1.0, 1.0, 1.0])),
        ];
        let first = window(&samples, 0.0, 10.0);
        assert_eq!(first[3].1, 105.0, "a from its zero, b from its start");
        let second = window(&samples, 10.0, 20.0);
        assert_eq!(
            second.iter().map(|b| b.1).collect::<Vec<_>>(),
            [0.0, 0.0, 100.0, 100.0]
        );
        // Every claim of the second window took 2-4 ms: its p99 is near 4 ms, the first's
        // near 1 ms, so the ratio shows the slowdown.
        assert!(quantile_ms(&second, 0.99).unwrap() > 3.9);
        assert!(quantile_ms(&first, 0.99).unwrap() <= 1.0);
    }
}
