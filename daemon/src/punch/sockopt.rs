//! The two socket-option calls the standard library and `socket2` do not
//! offer (forced buffer sizes, `TCP_INFO`, `SO_MAX_PACING_RATE`), in one
//! place: a plain-data value in, a plain-data value out.

use std::os::fd::RawFd;

/// `setsockopt(fd, level, option, value)`.
#[allow(unsafe_code)]
pub(crate) fn set<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| std::io::Error::other("socket option value too large"))?;
    // SAFETY: the pointer and length describe `value`, alive for the call;
    // `fd` is borrowed from a live socket by the caller.
    let rc = unsafe { libc::setsockopt(fd, level, option, std::ptr::from_ref(value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `getsockopt(fd, level, option)` into `out`; how many bytes the kernel
/// wrote (an older kernel writes fewer than a newer struct holds).
#[allow(unsafe_code)]
pub(crate) fn get_into(
    fd: RawFd,
    level: libc::c_int,
    option: libc::c_int,
    out: &mut [u8],
) -> std::io::Result<usize> {
    let mut len = libc::socklen_t::try_from(out.len())
        .map_err(|_| std::io::Error::other("socket option buffer too large"))?;
    // SAFETY: the pointers describe `out` and `len`, alive for the call;
    // the kernel writes at most `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, level, option, out.as_mut_ptr().cast(), &mut len) };
    if rc == 0 {
        Ok(usize::try_from(len).unwrap_or(0).min(out.len()))
    } else {
        Err(std::io::Error::last_os_error())
    }
}
