/* A stand-in for Windows' bcryptprimitives.dll, for running hostnet's Windows build under
 * Wine 8 only (never shipped). Rust's standard library (1.78 and later) takes its random
 * bytes from ProcessPrng in bcryptprimitives.dll, which Wine 8.0 does not have: without this
 * DLL beside the .exe, the program dies at load (status c0000135) before printing anything.
 * ProcessPrng is answered with advapi32's RtlGenRandom (SystemFunction036), which Wine has. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
