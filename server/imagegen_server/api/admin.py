"""The AdapterAdmin servicer: load, unload and list adapters at run time (admin role)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from imagegen.v1 import imagegen_pb2 as pb
from imagegen.v1 import imagegen_pb2_grpc as pb_grpc

from ..base.adapter_files import AdapterFile
from .adapters import AdapterRegistry

if TYPE_CHECKING:  # generic only in grpc-stubs, not at run time
    Context = grpc.aio.ServicerContext[Any, Any]


def adapter_message(file: AdapterFile, loaded: bool, unloading: bool = False) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=file.name,
        format=file.format,
        loaded=loaded,
        unloading=unloading,
        rank=file.rank,
        parameters=file.parameters,
        size_bytes=file.size_bytes,
    )


class AdapterAdminService(pb_grpc.AdapterAdminServicer):
    def __init__(self, registry: AdapterRegistry) -> None:
        self._registry = registry

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: Context) -> pb.AdapterInfo:
        return adapter_message(await self._registry.load(request.name), loaded=True)

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: Context
    ) -> pb.UnloadAdapterResponse:
        await self._registry.unload(request.name)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        loaded = {file.name: file for file in self._registry.loaded_files()}
        response = pb.ListAdaptersResponse()
        for name in sorted(set(self._registry.directory.names()) | set(loaded)):
            file = loaded.get(name)
            if file is None:
                try:
                    file = self._registry.directory.describe(name)
                except Exception:  # an unreadable file is listed by LoadAdapter's error, not here
                    continue
            unloading = name in loaded and name not in self._registry.selectable()
            response.adapters.append(adapter_message(file, name in loaded, unloading))
        return response
