//! The interface every compared store implements, and the two embedded stores: SQLite in WAL
//! mode (rusqlite, bundled) and redb.

use std::path::Path;

use redb::{Durability, ReadableDatabase, TableDefinition};
use rusqlite::Connection;

use crate::workload::{self, Batch};

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A spool as the gateway uses it: append a batch durably, read in order, acknowledge what was read.
pub trait Store {
    /// Appends the batch and returns once it is durable (one barrier per batch).
    fn append(&mut self, batch: &Batch) -> Res<()>;
    /// Reads up to `max` records after the last one read, oldest first, into `out`.
    fn read_chunk(&mut self, max: usize, out: &mut Batch) -> Res<()>;
    /// Deletes (or trims) everything read so far: the broker acknowledged it.
    fn ack(&mut self) -> Res<()>;
    /// Called once after the replay.
    fn finish(&mut self) -> Res<()> {
        Ok(())
    }
    /// fsync-class calls the store made itself, when it can count them.
    fn fsyncs(&self) -> Option<u64> {
        None
    }
    /// Corrupt records or regions skipped and counted.
    fn corrupt(&self) -> u64 {
        0
    }
}

pub struct Sqlite {
    conn: Connection,
    last_read: i64,
}

impl Sqlite {
    /// `synchronous` is `NORMAL` or `FULL`. In WAL mode NORMAL syncs only at checkpoints: a
    /// commit is atomic and survives a crash of the process, but a power cut may roll back the
    /// transactions committed since the last checkpoint. FULL also syncs the WAL at every commit.
    pub fn open(path: &Path, synchronous: &str) -> Res<Self> {
        let conn = Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if mode != "wal" {
            return Err(format!("journal_mode is {mode}, not wal").into());
        }
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, device TEXT NOT NULL, \
             at_us INTEGER NOT NULL, payload BLOB NOT NULL)",
        )?;
        Ok(Sqlite { conn, last_read: 0 })
    }
}

impl Store for Sqlite {
    fn append(&mut self, batch: &Batch) -> Res<()> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached("INSERT INTO r (id, device, at_us, payload) VALUES (?1, ?2, ?3, ?4)")?;
            for r in &batch.recs {
                ins.execute((
                    r.i as i64 + 1,
                    workload::DEVICE_NAMES[workload::device_of(r.i)],
                    workload::at_us(r.i) as i64,
                    batch.payload(r),
                ))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read_chunk(&mut self, max: usize, out: &mut Batch) -> Res<()> {
        out.clear();
        let mut sel = self.conn.prepare_cached("SELECT id, payload FROM r WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let mut rows = sel.query((self.last_read, max as i64))?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let p = row.get_ref(1)?.as_blob()?;
            out.push(id as u64 - 1, p);
            self.last_read = id;
        }
        Ok(())
    }

    fn ack(&mut self) -> Res<()> {
        self.conn.prepare_cached("DELETE FROM r WHERE id <= ?1")?.execute([self.last_read])?;
        Ok(())
    }
}

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("readings");

pub struct Redb {
    db: redb::Database,
    next_read: u64,
    acked: u64,
}

impl Redb {
    /// `cache_bytes`: redb's page cache; its default (1 GiB) lets it grow to the whole file.
    pub fn open(path: &Path, cache_bytes: Option<usize>) -> Res<Self> {
        let mut b = redb::Database::builder();
        if let Some(c) = cache_bytes {
            b.set_cache_size(c);
        }
        let db = b.create(path)?;
        Ok(Redb { db, next_read: 0, acked: 0 })
    }
}

impl Store for Redb {
    fn append(&mut self, batch: &Batch) -> Res<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut t = tx.open_table(TABLE)?;
            for r in &batch.recs {
                t.insert(r.i, batch.payload(r))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn read_chunk(&mut self, max: usize, out: &mut Batch) -> Res<()> {
        out.clear();
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for item in t.range(self.next_read..)?.take(max) {
            let (k, v) = item?;
            out.push(k.value(), v.value());
            self.next_read = k.value() + 1;
        }
        Ok(())
    }

    fn ack(&mut self) -> Res<()> {
        if self.next_read == self.acked {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut t = tx.open_table(TABLE)?;
            t.retain_in(self.acked..self.next_read, |_, _| false)?;
        }
        tx.commit()?;
        self.acked = self.next_read;
        Ok(())
    }
}
