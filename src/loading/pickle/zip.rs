//! The zip archives `torch.save` writes, read from the central directory
//! (local headers may leave sizes at zero), ZIP64 included: stored members
//! only (torch writes nothing compressed), names that stay inside the
//! archive, data inside the file.

use anyhow::{bail, ensure, Context};

/// A member's name and where its bytes are in the file.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

const EOCD: u32 = 0x0605_4b50;
const EOCD64: u32 = 0x0606_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

fn u16_at(b: &[u8], at: usize) -> anyhow::Result<u16> {
    let s = b.get(at..at + 2).context("the zip directory ends early")?;
    Ok(u16::from_le_bytes(s.try_into().expect("2 bytes")))
}

fn u32_at(b: &[u8], at: usize) -> anyhow::Result<u32> {
    let s = b.get(at..at + 4).context("the zip directory ends early")?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], at: usize) -> anyhow::Result<u64> {
    let s = b.get(at..at + 8).context("the zip directory ends early")?;
    Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// The members of the archive `data` (the whole file).
pub fn members(data: &[u8]) -> anyhow::Result<Vec<Member>> {
    let len = data.len();
    // The end record is the last 22 bytes, before a comment of up to 64 KiB.
    let earliest = len.saturating_sub(22 + 0xffff);
    let eocd = (earliest..=len.saturating_sub(22))
        .rev()
        .find(|&i| u32_at(data, i).ok() == Some(EOCD))
        .context("not a zip archive: no end of central directory")?;
    let mut entries = u16_at(data, eocd + 10)? as u64;
    let mut cd_size = u32_at(data, eocd + 12)? as u64;
    let mut cd_offset = u32_at(data, eocd + 16)? as u64;
    if eocd >= 20 && u32_at(data, eocd - 20)? == EOCD64_LOCATOR {
        let at = usize::try_from(u64_at(data, eocd - 12)?).context("ZIP64 record offset")?;
        ensure!(u32_at(data, at)? == EOCD64, "a ZIP64 locator that points at no ZIP64 record");
        entries = u64_at(data, at + 32)?;
        cd_size = u64_at(data, at + 40)?;
        cd_offset = u64_at(data, at + 48)?;
    }
    let end = cd_offset
        .checked_add(cd_size)
        .filter(|&e| e <= len as u64)
        .context("the central directory lies outside the file")?;
    let dir = &data[cd_offset as usize..end as usize];
    ensure!(entries <= dir.len() as u64 / 46, "{entries} members declared in a {}-byte directory", dir.len());
    let mut out = Vec::with_capacity(entries as usize);
    let mut at = 0;
    for _ in 0..entries {
        ensure!(u32_at(dir, at)? == CENTRAL, "a damaged central directory");
        let method = u16_at(dir, at + 10)?;
        let mut compressed = u32_at(dir, at + 20)? as u64;
        let mut size = u32_at(dir, at + 24)? as u64;
        let (n, m, k) =
            (u16_at(dir, at + 28)? as usize, u16_at(dir, at + 30)? as usize, u16_at(dir, at + 32)? as usize);
        let mut local = u32_at(dir, at + 42)? as u64;
        let name_bytes = dir.get(at + 46..at + 46 + n).context("the zip directory ends early")?;
        let name = String::from_utf8(name_bytes.to_vec()).context("a member name that is not UTF-8")?;
        let extra = dir.get(at + 46 + n..at + 46 + n + m).context("the zip directory ends early")?;
        // ZIP64: the 32-bit fields that overflowed follow in this order.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let (id, len) = (u16_at(extra, e)?, u16_at(extra, e + 2)? as usize);
            if id == 1 {
                let mut f = e + 4;
                for field in [&mut size, &mut compressed, &mut local] {
                    if *field == 0xffff_ffff {
                        *field = u64_at(extra, f)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        at += 46 + n + m + k;
        if name.split('/').any(|part| part == "..") || name.starts_with('/') || name.contains('\\') {
            bail!("member `{name}`: a path outside the archive");
        }
        if method != 0 {
            bail!("member `{name}` is compressed (method {method}); torch.save writes its archives uncompressed");
        }
        ensure!(compressed == size, "member `{name}`: stored with {compressed} bytes for {size}");
        let header = usize::try_from(local)
            .ok()
            .filter(|&h| h + 30 <= len)
            .with_context(|| format!("member `{name}`: its header lies outside the file"))?;
        ensure!(u32_at(data, header)? == LOCAL, "member `{name}`: no local header where the directory says");
        let skip = 30 + u16_at(data, header + 26)? as u64 + u16_at(data, header + 28)? as u64;
        let offset = local + skip;
        ensure!(
            offset.checked_add(size).is_some_and(|e| e <= len as u64),
            "member `{name}`: {size} bytes past the end of the file"
        );
        out.push(Member { name, offset, size });
    }
    Ok(out)
}
