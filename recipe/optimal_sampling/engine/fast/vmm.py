"""GPU memory whose physical pages can be handed back while its addresses stay reserved (CUDA virtual memory
management, through the driver API by ctypes), so that CUDA graphs reading it survive a sleep/wake.

Owns `SleepableBuffer`: reserve a virtual range once, map physical memory into it (`wake`), unmap and release the
physical memory (`sleep`); `tensor` is a uint8 view of the whole range (not counted by torch's allocator:
measure with torch.cuda.mem_get_info). Contents do not survive a sleep (zeroed on wake). Knows nothing about models
or graphs. The same mechanism as vLLM's sleep mode (CuMemAllocator), without a compiled extension.
"""

import ctypes
import functools

import torch

_PINNED, _DEVICE, _READ_WRITE, _GRANULARITY_MINIMUM = 1, 1, 3, 0  # CUDA driver enum values


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@functools.cache
def _driver():
    lib, u64, size, P = ctypes.CDLL("libcuda.so.1"), ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER
    lib.cuMemGetAllocationGranularity.argtypes = [P(size), P(_AllocationProp), ctypes.c_int]
    lib.cuMemAddressReserve.argtypes = [P(u64), size, size, u64, u64]
    lib.cuMemAddressFree.argtypes = [u64, size]
    lib.cuMemCreate.argtypes = [P(u64), size, P(_AllocationProp), u64]
    lib.cuMemRelease.argtypes = [u64]
    lib.cuMemMap.argtypes = [u64, size, size, u64, u64]
    lib.cuMemUnmap.argtypes = [u64, size]
    lib.cuMemSetAccess.argtypes = [u64, size, P(_AccessDesc), size]
    return lib


def unavailable_reason(device: torch.device) -> str | None:
    """Why SleepableBuffer cannot run on this device (None when it can)."""
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    try:
        _granularity(device.index or 0)
    except (OSError, RuntimeError, AttributeError) as e:
        return f"CUDA virtual memory management is not available ({e})"
    return None


def _check(result: int, what: str, nbytes: int = 0) -> None:
    if result == 2:  # CUDA_ERROR_OUT_OF_MEMORY
        raise MemoryError(f"{what}: {nbytes / 2**30:.2f} GiB of KV cache do not fit in the free GPU memory any more")
    if result != 0:
        raise RuntimeError(f"{what} failed with CUresult {result}")


def _prop(ordinal: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type, prop.location.type, prop.location.id = _PINNED, _DEVICE, ordinal
    return prop


@functools.cache
def _granularity(ordinal: int) -> int:
    size = ctypes.c_size_t()
    _check(_driver().cuMemGetAllocationGranularity(ctypes.byref(size), ctypes.byref(_prop(ordinal)), 0), "granularity")
    return size.value


class _CudaArray:
    """A raw device range as __cuda_array_interface__, for torch.as_tensor (zero-copy)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }


class SleepableBuffer:
    """nbytes of device memory at a fixed address; `sleep` frees the physical memory, `wake` maps new memory."""

    def __init__(self, nbytes: int, device: torch.device):
        self.ordinal = device.index if device.index is not None else torch.cuda.current_device()
        gran = _granularity(self.ordinal)
        self.size = -(-nbytes // gran) * gran
        torch.cuda.synchronize(self.ordinal)  # the device's primary context is current on this thread
        ptr = ctypes.c_uint64()
        _check(_driver().cuMemAddressReserve(ctypes.byref(ptr), self.size, 0, 0, 0), "reserve")
        self.ptr, self.handle = ptr.value, None
        self.wake()
        self.tensor = torch.as_tensor(_CudaArray(self.ptr, self.size), device=f"cuda:{self.ordinal}")[:nbytes]
        self.tensor.zero_()

    def wake(self) -> None:
        """Map fresh physical memory (zeroed) into the reserved range; no-op when awake."""
        if self.handle is not None:
            return
        lib, handle = _driver(), ctypes.c_uint64()
        torch.cuda.synchronize(self.ordinal)
        _check(
            lib.cuMemCreate(ctypes.byref(handle), self.size, ctypes.byref(_prop(self.ordinal)), 0),
            "waking the KV caches",
            self.size,
        )
        _check(lib.cuMemMap(self.ptr, self.size, 0, handle.value, 0), "map")
        access = _AccessDesc()
        access.location.type, access.location.id, access.flags = _DEVICE, self.ordinal, _READ_WRITE
        _check(lib.cuMemSetAccess(self.ptr, self.size, ctypes.byref(access), 1), "access")
        self.handle = handle.value
        if hasattr(self, "tensor"):
            self.tensor.zero_()

    def sleep(self) -> None:
        """Unmap and release the physical memory (the addresses stay reserved); no-op when asleep."""
        if self.handle is None:
            return
        lib = _driver()
        torch.cuda.synchronize(self.ordinal)
        _check(lib.cuMemUnmap(self.ptr, self.size), "unmap")
        _check(lib.cuMemRelease(self.handle), "release")
        self.handle = None

    def __del__(self):
        try:
            self.sleep()
            _driver().cuMemAddressFree(self.ptr, self.size)
        except Exception:  # interpreter shutdown: the driver frees everything anyway
            pass
