#!/usr/bin/env python3
"""A CSI driver that is not Berth, for `berth bench` to drive.

Written on another gRPC stack (Python grpcio), with other choices than
Berth's: ids are `mock-<n>`, the controller advertises CREATE_DELETE_VOLUME
only (no attach), the node advertises STAGE_UNSTAGE_VOLUME, publish and
stage create the path given (no mount, so no root needed) and unpublish and
unstage remove it. Everything is kept in memory; every RPC is appended to
the call log and the state is written to a JSON file after each change, so
a test can check what the client did and what it left behind.

    mock_csi.py <socket path> <state json> [--fail-every N]

--fail-every N answers every Nth NodePublishVolume with UNAVAILABLE (so the
client's clean-up of a failed cycle is exercised).
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent import futures

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def load_stubs():
    out = tempfile.mkdtemp(prefix="mock-csi-stubs.")
    inc = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{inc}", f"--python_out={out}",
                      f"--grpc_python_out={out}", os.path.join(PROTO_DIR, "csi.proto")])
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    import csi_pb2, csi_pb2_grpc  # noqa: E402
    return out, csi_pb2, csi_pb2_grpc


STUB_DIR, pb, rpc = load_stubs()


class State:
    def __init__(self, path, fail_every):
        self.path = path
        self.fail_every = fail_every
        self.lock = threading.Lock()
        self.next_id = 0
        self.volumes = {}  # id -> name
        self.names = {}  # name -> id
        self.staged = {}  # staging path -> id
        self.published = {}  # target path -> id
        self.calls = {}  # method -> count
        self.publishes = 0
        self.save()

    def call(self, method):
        self.calls[method] = self.calls.get(method, 0) + 1

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"volumes": self.volumes, "staged": self.staged,
                       "published": self.published, "calls": self.calls}, f)
        os.replace(tmp, self.path)


def cap(t):
    return pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))


class Identity(rpc.IdentityServicer):
    def __init__(self, st):
        self.st = st

    def GetPluginInfo(self, req, ctx):
        return pb.GetPluginInfoResponse(name="mock.csi.example", vendor_version="0.1")

    def GetPluginCapabilities(self, req, ctx):
        svc = pb.PluginCapability.Service.CONTROLLER_SERVICE
        return pb.GetPluginCapabilitiesResponse(capabilities=[
            pb.PluginCapability(service=pb.PluginCapability.Service(type=svc))])

    def Probe(self, req, ctx):
        return pb.ProbeResponse()


class Controller(rpc.ControllerServicer):
    def __init__(self, st):
        self.st = st

    def ControllerGetCapabilities(self, req, ctx):
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            cap(pb.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME)])

    def CreateVolume(self, req, ctx):
        if not req.name:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "name missing")
        with self.st.lock:
            self.st.call("CreateVolume")
            vid = self.st.names.get(req.name)
            if vid is None:
                vid = f"mock-{self.st.next_id}"
                self.st.next_id += 1
                self.st.names[req.name] = vid
                self.st.volumes[vid] = req.name
                self.st.save()
        size = req.capacity_range.required_bytes or (1 << 20)
        return pb.CreateVolumeResponse(volume=pb.Volume(volume_id=vid, capacity_bytes=size))

    def DeleteVolume(self, req, ctx):
        with self.st.lock:
            self.st.call("DeleteVolume")
            name = self.st.volumes.pop(req.volume_id, None)
            if name is not None:
                self.st.names.pop(name, None)
                self.st.save()
        return pb.DeleteVolumeResponse()


class Node(rpc.NodeServicer):
    def __init__(self, st):
        self.st = st

    def NodeGetCapabilities(self, req, ctx):
        t = pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t))])

    def NodeGetInfo(self, req, ctx):
        return pb.NodeGetInfoResponse(node_id="mock-node")

    def _known(self, ctx, vid):
        if vid not in self.st.volumes:
            ctx.abort(grpc.StatusCode.NOT_FOUND, f"no volume {vid}")

    def NodeStageVolume(self, req, ctx):
        with self.st.lock:
            self.st.call("NodeStageVolume")
            self._known(ctx, req.volume_id)
            os.makedirs(req.staging_target_path, exist_ok=True)
            self.st.staged[req.staging_target_path] = req.volume_id
            self.st.save()
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, req, ctx):
        with self.st.lock:
            self.st.call("NodeUnstageVolume")
            if self.st.staged.pop(req.staging_target_path, None) is not None:
                self.st.save()
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, req, ctx):
        with self.st.lock:
            self.st.call("NodePublishVolume")
            self._known(ctx, req.volume_id)
            if self.st.staged.get(req.staging_target_path) != req.volume_id:
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "not staged")
            self.st.publishes += 1
            if self.st.fail_every and self.st.publishes % self.st.fail_every == 0:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
            os.makedirs(req.target_path, exist_ok=True)
            self.st.published[req.target_path] = req.volume_id
            self.st.save()
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, req, ctx):
        with self.st.lock:
            self.st.call("NodeUnpublishVolume")
            if self.st.published.pop(req.target_path, None) is not None:
                try:
                    os.rmdir(req.target_path)
                except FileNotFoundError:
                    pass
                self.st.save()
        return pb.NodeUnpublishVolumeResponse()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("state")
    ap.add_argument("--fail-every", type=int, default=0)
    a = ap.parse_args()
    st = State(a.state, a.fail_every)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    rpc.add_IdentityServicer_to_server(Identity(st), server)
    rpc.add_ControllerServicer_to_server(Controller(st), server)
    rpc.add_NodeServicer_to_server(Node(st), server)
    server.add_insecure_port(f"unix://{a.socket}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    shutil.rmtree(STUB_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
