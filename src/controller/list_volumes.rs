//! ListVolumes: pages in creation order. The token is the creation sequence
//! number of the last volume the page covered, so deleting that volume or
//! creating new ones between pages loses nothing. A volume whose create
//! began before a page was read and was still under way then (not listed:
//! its sequence number is taken when the create begins) is not listed by
//! the rest of that walk either; a new walk lists it (the spec lets a CO
//! expect no consistent view across pages). A token that was never handed
//! out is ABORTED. A page holds at most `PAGE_BYTES` of entries, with or
//! without `max_entries` (`config::LIST_PAGE_BYTES`).
use std::sync::Arc;

use super::volume;
use crate::csi::v1 as csi;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::state::{Phase, VolumeRecord};

/// The checks every paged List RPC makes: `max_entries` is not negative,
/// and the token is a sequence number that was handed out (ABORTED
/// otherwise, as the spec asks). Returns where the page starts after.
pub fn page_start(max_entries: i32, token: &str, last_seq: u64) -> Result<u64> {
    if max_entries < 0 {
        return Err(Error::Invalid("max_entries must not be negative".into()));
    }
    if token.is_empty() {
        return Ok(0);
    }
    token
        .parse::<u64>()
        .ok()
        // Only the form handed out: "+1" or "01" were never a token.
        .filter(|t| *t > 0 && *t <= last_seq && t.to_string() == token)
        .ok_or_else(|| {
            Error::Busy(format!(
                "starting_token {:?} is not valid",
                token.chars().take(128).collect::<String>()
            ))
        })
}

/// The entries of `entries` (each with the sequence number of its record, in
/// order) that fit in `limit` bytes encoded, and the token of the next
/// page: the last kept entry's sequence number when some were left out,
/// else `next` (the store's). The first entry is always kept, so a page
/// is never empty while entries remain.
pub fn fit_page<T: prost::Message>(
    entries: Vec<(u64, T)>,
    next: Option<u64>,
    limit: usize,
) -> (Vec<T>, Option<u64>) {
    let mut used = 0;
    let mut out = Vec::with_capacity(entries.len());
    let mut last = None;
    for (seq, e) in entries {
        // A repeated field's entry: its tag, its length and its bytes.
        let len = e.encoded_len();
        let len = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !out.is_empty() && used + len > limit {
            return (out, last);
        }
        used += len;
        last = Some(seq);
        out.push(e);
    }
    (out, next)
}

/// Whether ListVolumes lists a record: a volume created and not being
/// deleted (a record Creating was never handed out; one Deleting is a
/// volume the CO asked gone, NOT_FOUND for the calls that describe a
/// volume: `Driver::require_not_deleting`). Internal records (a disk
/// waiting to be wiped) are not volumes; one of a kind (or NFS share) no
/// longer served is, listed with an abnormal condition saying why
/// (`volume::condition`). Asked under the store's lock: no look at the
/// store.
fn listed(d: &Driver, r: &VolumeRecord) -> bool {
    r.phase == Phase::Ready && (d.id_is_plausible(&r.id) || d.unserved_of(r).is_some())
}

pub async fn handle(
    d: Arc<Driver>,
    req: csi::ListVolumesRequest,
) -> Result<csi::ListVolumesResponse> {
    let after = page_start(req.max_entries, &req.starting_token, d.store.last_seq())?;
    // Only the volumes listed count towards `max_entries` (a page is
    // short only when no more follow), and the token is the last listed
    // one's sequence number.
    let max = usize::try_from(req.max_entries).unwrap_or(0);
    let (recs, more) = d.store.page_matching(after, max, |r| listed(&d, r));
    let next = recs.last().filter(|_| more).map(|r| r.seq);
    let limit = d.cfg.list_page_bytes;
    // Blocking: each volume's condition looks at its storage (an lstat of
    // a directory or file, a bounded probe of an NFS share), on an
    // operation's thread, never on the one that answers every call.
    let entries = tokio::task::spawn_blocking(move || {
        recs.iter()
            .map(|r| {
                let e = csi::list_volumes_response::Entry {
                    volume: Some(volume::to_proto(&d, r)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: volume::published_nodes(r),
                        volume_condition: Some(volume::condition(&d, r)),
                    }),
                };
                (r.seq, e)
            })
            .collect()
    })
    .await
    .map_err(|e| Error::Internal(format!("ListVolumes task failed: {e}")))?;
    let (entries, next) = fit_page(entries, next, limit);
    Ok(csi::ListVolumesResponse {
        entries,
        next_token: next.map(|n| n.to_string()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn entry(id: &str) -> csi::list_volumes_response::Entry {
        csi::list_volumes_response::Entry {
            volume: Some(csi::Volume {
                volume_id: id.into(),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn ids(v: &[csi::list_volumes_response::Entry]) -> Vec<&str> {
        v.iter()
            .map(|e| e.volume.as_ref().map_or("", |v| v.volume_id.as_str()))
            .collect()
    }

    /// A page holds the entries that fit in the limit, encoded as the
    /// answer holds them, and names the last of them as the next page's
    /// start; entries that all fit keep the store's token.
    #[test]
    fn a_page_holds_what_fits_and_names_where_the_rest_starts() {
        // Each entry: 1 tag byte, 1 length byte, and its 12 bytes
        // (volume: tag, length, then volume_id: tag, length, 8 bytes).
        let all = || {
            (1..=5u64)
                .map(|i| (i * 10, entry(&format!("vol-000{i}"))))
                .collect::<Vec<_>>()
        };
        assert_eq!(entry("vol-0001").encoded_len(), 12);
        let (page, next) = fit_page(all(), None, 5 * 14);
        assert_eq!((ids(&page).len(), next), (5, None));
        let (page, next) = fit_page(all(), Some(99), 5 * 14);
        assert_eq!((page.len(), next), (5, Some(99)));
        let (page, next) = fit_page(all(), None, 5 * 14 - 1);
        assert_eq!(ids(&page), ["vol-0001", "vol-0002", "vol-0003", "vol-0004"]);
        assert_eq!(next, Some(40));
        let (page, next) = fit_page(all(), Some(99), 2 * 14);
        assert_eq!((page.len(), next), (2, Some(20)));
        // One entry larger than the limit is still listed, alone.
        let (page, next) = fit_page(all(), None, 3);
        assert_eq!((ids(&page), next), (vec!["vol-0001"], Some(10)));
        let (page, next) = fit_page(
            Vec::<(u64, csi::list_volumes_response::Entry)>::new(),
            None,
            3,
        );
        assert_eq!((page.len(), next), (0, None));
    }
}
