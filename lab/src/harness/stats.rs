//! Quantiles of measured samples, shared by the latency client, the
//! punch-timing suite and the load generator.

/// The `p` quantile (0..=1) of already sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
