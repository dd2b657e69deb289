//! Negotiate (Kerberos, else NTLM) and NTLM through Windows SSPI, as the
//! account the process runs as: a service's own logon, so the config holds no
//! credential. The one module of the crate with `unsafe`: five calls into
//! secur32.dll, each commented with what it relies on.
//!
//! `InitializeSecurityContextW` may ask a domain controller for a Kerberos
//! ticket, so it runs on the blocking pool, never on a runtime worker.

#![expect(unsafe_code)]

use std::ptr;

use windows_sys::Win32::Foundation::{
    SEC_E_OK, SEC_I_COMPLETE_AND_CONTINUE, SEC_I_COMPLETE_NEEDED, SEC_I_CONTINUE_NEEDED,
};
use windows_sys::Win32::Security::Authentication::Identity::{
    AcquireCredentialsHandleW, CompleteAuthToken, DeleteSecurityContext, FreeContextBuffer,
    FreeCredentialsHandle, InitializeSecurityContextW, SecBuffer, SecBufferDesc,
    ISC_REQ_ALLOCATE_MEMORY, SECBUFFER_TOKEN, SECBUFFER_VERSION, SECPKG_CRED_OUTBOUND,
    SECURITY_NATIVE_DREP,
};
use windows_sys::Win32::Security::Credentials::SecHandle;

use super::scheme::{ProxyAuthError, Scheme};

/// One handshake's SSPI state: the credentials of the process's logon and the
/// security context being built. Both handles are freed on drop.
pub(super) struct Context {
    scheme: Scheme,
    /// `HTTP/<proxy host>`, NUL-terminated UTF-16: the proxy's service principal.
    target: Vec<u16>,
    cred: SecHandle,
    ctx: Option<SecHandle>,
    complete: bool,
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

fn failed(what: &str, scheme: Scheme, status: i32) -> ProxyAuthError {
    ProxyAuthError::Protocol(format!(
        "SSPI {what} for {scheme} as this process's account failed (0x{:08x})",
        status as u32
    ))
}

impl Context {
    pub(super) fn new(scheme: Scheme, proxy_host: &str) -> Result<Self, ProxyAuthError> {
        let package = wide(match scheme {
            Scheme::Negotiate => "Negotiate",
            _ => "NTLM",
        });
        let mut cred = SecHandle {
            dwLower: 0,
            dwUpper: 0,
        };
        let mut expiry = 0i64;
        // SAFETY: `package` is a NUL-terminated UTF-16 string that outlives the
        // call; null principal, logon id and auth data select the calling
        // process's own credentials; `cred` and `expiry` are valid for writes.
        let status = unsafe {
            AcquireCredentialsHandleW(
                ptr::null(),
                package.as_ptr(),
                SECPKG_CRED_OUTBOUND,
                ptr::null(),
                ptr::null(),
                None,
                ptr::null(),
                &mut cred,
                &mut expiry,
            )
        };
        if status != SEC_E_OK {
            return Err(failed("AcquireCredentialsHandle", scheme, status));
        }
        Ok(Self {
            scheme,
            target: wide(&format!("HTTP/{proxy_host}")),
            cred,
            ctx: None,
            complete: false,
        })
    }

    pub(super) fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The next token: the first with no input, then one per server token.
    /// `None` once the context is complete and has nothing more to send.
    pub(super) async fn step(
        &mut self,
        input: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, ProxyAuthError> {
        if self.complete {
            return Ok(None);
        }
        let (cred, ctx, target) = (Handle(self.cred), self.ctx.map(Handle), self.target.clone());
        let (new_ctx, status, token) =
            tokio::task::spawn_blocking(move || initialize(cred, ctx, &target, input.as_deref()))
                .await
                .map_err(|_| ProxyAuthError::Protocol("SSPI call did not finish".into()))?;
        if let Some(h) = new_ctx {
            self.ctx = Some(h.0);
        }
        match status {
            SEC_E_OK => {
                self.complete = true;
                Ok(Some(token).filter(|t| !t.is_empty()))
            }
            SEC_I_CONTINUE_NEEDED => Ok(Some(token)),
            other => Err(failed("InitializeSecurityContext", self.scheme, other)),
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            // SAFETY: `ctx` came from InitializeSecurityContextW and is freed once.
            unsafe { DeleteSecurityContext(&ctx) };
        }
        // SAFETY: `cred` came from AcquireCredentialsHandleW and is freed once.
        unsafe { FreeCredentialsHandle(&self.cred) };
    }
}

/// A handle moved to the blocking pool and back: plain integers, owned by the
/// `Context` that waits for the call.
#[derive(Clone, Copy)]
struct Handle(SecHandle);

/// One InitializeSecurityContextW call: the context (new on the first call),
/// its status, and the output token copied out of SSPI's buffer.
fn initialize(
    cred: Handle,
    ctx: Option<Handle>,
    target: &[u16],
    input: Option<&[u8]>,
) -> (Option<Handle>, i32, Vec<u8>) {
    let mut in_buf = SecBuffer {
        cbBuffer: input.map_or(0, |i| u32::try_from(i.len()).unwrap_or(u32::MAX)),
        BufferType: SECBUFFER_TOKEN,
        pvBuffer: input.map_or(ptr::null_mut(), |i| i.as_ptr().cast_mut().cast()),
    };
    let in_desc = SecBufferDesc {
        ulVersion: SECBUFFER_VERSION,
        cBuffers: 1,
        pBuffers: &mut in_buf,
    };
    let mut out_buf = SecBuffer {
        cbBuffer: 0,
        BufferType: SECBUFFER_TOKEN,
        pvBuffer: ptr::null_mut(),
    };
    let mut out_desc = SecBufferDesc {
        ulVersion: SECBUFFER_VERSION,
        cBuffers: 1,
        pBuffers: &mut out_buf,
    };
    let mut new_ctx = ctx.map_or(
        SecHandle {
            dwLower: 0,
            dwUpper: 0,
        },
        |h| h.0,
    );
    let mut attrs = 0u32;
    let mut expiry = 0i64;
    // SAFETY: `cred` is a live credentials handle and `ctx`, when present, the
    // live context of earlier calls; `target` is NUL-terminated; the input
    // buffer points at `input`, which outlives the call and is only read; SSPI
    // allocates the output (ISC_REQ_ALLOCATE_MEMORY) and we free it below;
    // every out-pointer is valid for writes.
    let status = unsafe {
        InitializeSecurityContextW(
            &cred.0,
            ctx.as_ref()
                .map_or(ptr::null(), |h| &h.0 as *const SecHandle),
            target.as_ptr(),
            ISC_REQ_ALLOCATE_MEMORY,
            0,
            SECURITY_NATIVE_DREP,
            if input.is_some() {
                &in_desc as *const SecBufferDesc
            } else {
                ptr::null()
            },
            0,
            &mut new_ctx,
            &mut out_desc,
            &mut attrs,
            &mut expiry,
        )
    };
    let created = status == SEC_E_OK
        || status == SEC_I_CONTINUE_NEEDED
        || status == SEC_I_COMPLETE_NEEDED
        || status == SEC_I_COMPLETE_AND_CONTINUE;
    let mut status = status;
    if status == SEC_I_COMPLETE_NEEDED || status == SEC_I_COMPLETE_AND_CONTINUE {
        // SAFETY: `new_ctx` is the context just initialized; `out_desc` is the
        // output SSPI filled in.
        let done = unsafe { CompleteAuthToken(&new_ctx, &out_desc) };
        status = if done != SEC_E_OK {
            done
        } else if status == SEC_I_COMPLETE_NEEDED {
            SEC_E_OK
        } else {
            SEC_I_CONTINUE_NEEDED
        };
    }
    let token = if out_buf.pvBuffer.is_null() {
        Vec::new()
    } else {
        // SAFETY: SSPI allocated `cbBuffer` bytes at `pvBuffer`; they are copied
        // out before the buffer is freed, once.
        unsafe {
            let bytes = std::slice::from_raw_parts(
                out_buf.pvBuffer.cast::<u8>(),
                out_buf.cbBuffer as usize,
            )
            .to_vec();
            FreeContextBuffer(out_buf.pvBuffer);
            bytes
        }
    };
    (created.then_some(Handle(new_ctx)), status, token)
}
