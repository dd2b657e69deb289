/*
 * Test fixture only, never shipped: Rust's standard library (1.78 and later)
 * imports ProcessPrng from bcryptprimitives.dll, which Wine provides only from
 * 8.13. Debian's Wine 8.0 lacks the DLL, so the Windows test binaries cannot
 * start under it. Placed beside the .exe, this DLL answers ProcessPrng from
 * BCryptGenRandom, which Wine 8.0 has.
 *
 * Built by .ci/run:
 *   x86_64-w64-mingw32-gcc -shared -O2 -o bcryptprimitives.dll \
 *     tests/wine/processprng.c tests/wine/processprng.def -lbcrypt
 */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
