//! Migration from the per-room ticket journals of earlier weir versions
//! (`data_dir/tickets/{room}.log`), replaced by reserved ranges (`ranges`).
//!
//! A journal is a 16-byte header (`MAGIC`, then the ticket number the file starts after), then
//! one 32-byte record per ticket with a check over its number and contents; a torn or
//! unacknowledged tail fails the check. Only the last valid ticket matters now: at open the store
//! records it as the room's confirmed and reserved count, then removes the journals.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::StoreError;

const MAGIC: &[u8; 8] = b"WEIRTKT1";
const HEADER: usize = 16;
const RECORD: usize = 32;

fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{}: {e}", path.display()))
}

/// A record's check: SplitMix64 steps over its ticket number and fields.
fn check(ticket: u64, record: &[u8; RECORD]) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let word = |i: usize| u64::from_le_bytes(record[i..i + 8].try_into().unwrap_or_default());
    [ticket, word(0), word(8), word(16)].iter().fold(0x5745_4952_544b_5431, |acc, w| mix(acc ^ w))
}

/// The last acknowledged ticket of one journal.
fn last_ticket(path: &Path) -> Result<u64, StoreError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut header = [0u8; HEADER];
    reader.read_exact(&mut header).map_err(|e| StoreError::Corrupt(format!("{}: not a ticket journal ({e})", path.display())))?;
    if &header[..8] != MAGIC {
        return Err(StoreError::Corrupt(format!("{}: not a ticket journal", path.display())));
    }
    let mut last = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let mut record = [0u8; RECORD];
    // Records are acknowledged in order, so the first invalid one ends the journal.
    while reader.read_exact(&mut record).is_ok() {
        if u64::from_le_bytes(record[24..32].try_into().unwrap_or_default()) != check(last + 1, &record) {
            break;
        }
        last += 1;
    }
    Ok(last)
}

/// Every journal's room and last ticket (none if `dir` does not exist).
pub fn last_tickets(dir: &Path) -> Result<Vec<(String, u64)>, StoreError> {
    let items = match std::fs::read_dir(dir) {
        Ok(items) => items,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, e)),
    };
    let mut out = Vec::new();
    for item in items {
        let path = item.map_err(|e| io(dir, e))?.path();
        if let Some(room) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".log")) {
            out.push((room.to_string(), last_ticket(&path)?));
        }
    }
    Ok(out)
}

/// Removes the journals once their counts are durable elsewhere.
pub fn remove(dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(dir, e)),
        _ => Ok(()),
    }
}

/// Writes a journal as earlier versions did: `records` valid tickets after `base`, then `tail`.
#[cfg(test)]
pub fn write_for_test(dir: &Path, room: &str, base: u64, records: u64, tail: &[u8]) {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&base.to_le_bytes());
    for t in base + 1..=base + records {
        let mut record = [0u8; RECORD];
        record[..16].copy_from_slice(&[t as u8; 16]);
        record[16..24].copy_from_slice(&(1_000 + t as i64).to_le_bytes());
        let c = check(t, &record);
        record[24..].copy_from_slice(&c.to_le_bytes());
        bytes.extend_from_slice(&record);
    }
    bytes.extend_from_slice(tail);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{room}.log")), bytes).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_valid_ticket_of_each_journal_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let tickets = dir.path().join("tickets");
        assert!(last_tickets(&tickets).unwrap().is_empty(), "no journals: nothing to migrate");
        write_for_test(&tickets, "a", 0, 3, &[0u8; 4096]);
        write_for_test(&tickets, "b", 41, 2, &[7u8; RECORD + 5]);
        let mut found = last_tickets(&tickets).unwrap();
        found.sort();
        assert_eq!(found, vec![("a".to_string(), 3), ("b".to_string(), 43)], "grown zeros and torn tails end a journal");
        std::fs::write(tickets.join("c.log"), b"not a journal").unwrap();
        assert!(matches!(last_tickets(&tickets), Err(StoreError::Corrupt(_))));
        remove(&tickets).unwrap();
        assert!(!tickets.exists());
        remove(&tickets).unwrap();
    }
}
