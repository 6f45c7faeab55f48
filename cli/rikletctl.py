"""rikletctl: drive a riklet node agent over its Node API.

Finds the agent through ``--endpoint`` or ``RIKLET_ENDPOINT`` (default ``127.0.0.1:9091``).
Exit codes: 0 success, 1 the agent refused the request (its error is printed), 2 bad usage,
3 the agent could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import grpc

from cli import events as events_cli
from common import config, paths, pb
from common.errors import InvalidArgument
from common.model import MAX_MANIFEST_BYTES, RESTART_POLICIES, dns_label
from common.units import parse_cpu, parse_memory

pb.ensure()
from cli import apps, completion, connect, output, pods, pull, volume  # noqa: E402  (stubs made above)
from cli import exec as exec_cli  # noqa: E402
from cli import logs as logs_cli  # noqa: E402
from cli import watch as watch_cli  # noqa: E402
from cli.output import DOCS, FORMATS  # noqa: E402
from common.pb import node_pb2 as npb  # noqa: E402  (generated just above when missing)
from common.pb import node_pb2_grpc as npb_grpc  # noqa: E402

pod_json, _age = pods.pod_json, pods.age
DEFAULT_ENDPOINT = connect.DEFAULT_ENDPOINT
LIST_PAGE = 500          # pods per List call: `get pods` fetches page after page


def proxy_line(proxy: dict[str, Any] | None) -> str:
    """``rikletctl node``'s line on the proxy: its mode (and why), host ports and endpoints."""
    if proxy is None:
        return "proxy: unknown (the agent does not say)"
    if not proxy.get("up"):
        return "proxy: not answering"
    line = f"proxy: {proxy.get('mode', 'userspace')} mode"
    if proxy.get("mode_reason"):
        line += f" ({proxy['mode_reason']})"
    ports = proxy.get("ports")
    if isinstance(ports, list):
        ready = sum(int(p.get("ready", 0)) for p in ports if isinstance(p, dict))
        total = sum(int(p.get("endpoints", 0)) for p in ports if isinstance(p, dict))
        line += (f", {len(ports)} host ports, {ready}/{total} endpoints ready, "
                 f"{proxy.get('conntrack_entries', 0)} conntrack entries")
    return line


class Usage(Exception):
    pass


def _port_flag(text: str, i: int) -> dict[str, Any]:
    spec, _, proto = text.partition("/")
    host, sep, target = spec.partition(":")
    entry: dict[str, Any]
    try:
        entry = {"port": int(host), "target_port": int(target)} if sep else {"target_port": int(host)}
    except ValueError as exc:
        raise InvalidArgument(f"expected HOST:TARGET[/tcp|/udp], got {text!r}", f"--port[{i}]") from exc
    if proto:
        entry["protocol"] = proto.upper()
    return entry


def run_manifest(args: argparse.Namespace) -> dict[str, Any]:
    dns_label(args.name, "NAME")
    if not args.command and not args.image:
        raise InvalidArgument("give the command after --, e.g. -- python3 -m http.server, or an --image",
                              "CMD")
    container: dict[str, Any] = {"name": args.container or args.name}
    if args.command:
        container["command"] = args.command  # with an image: replaces its entrypoint and cmd
    if args.image:
        container["image"] = args.image
    env: dict[str, str] = {}
    for i, item in enumerate(args.env):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"expected K=V, got {item!r}", f"--env[{i}]")
        env[key] = value
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if args.port:
        container["ports"] = [_port_flag(p, i) for i, p in enumerate(args.port)]
    resources: dict[str, Any] = {}
    if args.cpu is not None:
        parse_cpu(args.cpu, "--cpu")
        resources["cpu"] = args.cpu
    if args.memory is not None:
        parse_memory(args.memory, "--memory")
        resources["memory"] = args.memory
    if resources:
        container["resources"] = resources
    if args.workdir:
        container["workingDir"] = args.workdir
    spec: dict[str, Any] = {"containers": [container], "restartPolicy": args.restart}
    if args.host_network:
        spec["hostNetwork"] = True
    if args.grace is not None:
        spec["terminationGracePeriodSeconds"] = args.grace
    return {"apiVersion": "v1", "kind": "Pod", "name": args.name, "spec": spec}


def default_token_file() -> str:
    """The agent's token file as the agent would find it (its configuration, or the default
    ``<state_dir>/api-token``)."""
    try:
        return config.load().token_path
    except InvalidArgument:
        return os.path.join(os.environ.get("RIKLET_STATE_DIR", paths.default_state_dir()), "api-token")


open_channel = connect.open_channel


def read_manifest(stream: BinaryIO, name: str) -> str:
    """A manifest as UTF-8 text, refused here when the agent would refuse it for its size (and
    read no further: ``-f -`` may be endless) or when it is not UTF-8."""
    data = stream.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidArgument(f"{name}: larger than the {MAX_MANIFEST_BYTES} bytes a manifest may be", "-f")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start})", "-f") from exc


class Ctl:
    def __init__(self, endpoint: str, fmt: str = "table", token: str | None = None,
                 tls: tuple[str | None, str | None, str | None] = (None, None, None)) -> None:
        self.channel = open_channel(endpoint, token, *tls)
        self.stub = npb_grpc.NodeStub(self.channel)
        self.fmt = fmt
        self.json = fmt in ("json", "yaml")   # a document rather than a table (yaml: printed as yaml)

    def show(self, pods: Sequence[npb.Pod], single: bool = False) -> None:
        output.emit(watch_cli.listing(self), pods, self.fmt, single)

    def print_doc(self, data: Any) -> None:
        print(output.dump(data, "yaml" if self.fmt == "yaml" else "json").rstrip("\n"))

    def apply(self, args: argparse.Namespace) -> None:
        if args.filename == "-":
            text, fmt = read_manifest(sys.stdin.buffer, "-"), ""
        else:
            with open(args.filename, "rb") as fh:
                text = read_manifest(fh, args.filename)
            fmt = "yaml" if args.filename.endswith((".yaml", ".yml")) else (
                "json" if args.filename.endswith(".json") else "")
        self._apply(text, fmt)

    def _apply(self, text: str, fmt: str) -> None:
        reply = self.stub.Apply(npb.ApplyRequest(manifest=text, format=fmt), timeout=30)
        if self.fmt != "table":
            self.show(reply.pods)
            return
        for line in apps.applied_lines(self.stub, reply):
            print(line)

    def run(self, args: argparse.Namespace) -> None:
        self._apply(json.dumps(run_manifest(args)), "json")

    def get(self, args: argparse.Namespace) -> int | None:
        if args.what in ("apps", "app"):
            one = [self.stub.Get(npb.GetRequest(name=args.name), timeout=10)] if args.name else None
            apps.show(one or self.list_all(), self.fmt)
        elif args.watch or args.watch_only:
            return watch_cli.watch(self, args)
        elif args.name:
            self.show([self.stub.Get(npb.GetRequest(name=args.name), timeout=10)], single=True)
        else:
            self.show(self.list_all())
        return None

    def list_all(self) -> list[npb.Pod]:
        """Every pod, a page at a time (each reply stays small whatever the node holds)."""
        pods: list[npb.Pod] = []
        token = ""
        while True:
            reply = self.stub.List(npb.ListRequest(limit=LIST_PAGE, continue_token=token), timeout=10)
            pods.extend(reply.pods)
            token = reply.continue_token
            if not token:
                return pods

    def delete(self, args: argparse.Namespace) -> None:
        if args.all or args.workload:
            # one call, however many pods: memory marks them all in one transaction
            reply = self.stub.Delete(npb.DeleteRequest(workload=args.workload or "", all=args.all),
                                     timeout=30)
            for name in reply.deleted:
                print(f"pod/{name} deleted")
            return
        for name in args.names:
            reply = self.stub.Delete(npb.DeleteRequest(name=name), timeout=10)
            print(apps.deleted_line(self.stub, reply.pod, name))

    def stop(self, args: argparse.Namespace) -> None:
        for name in args.names:
            self.stub.Stop(npb.StopRequest(name=name), timeout=10)
            print(f"pod/{name} stopped")

    def resize(self, args: argparse.Namespace) -> None:
        reply = self.stub.Resize(npb.ResizeRequest(name=args.name, container=args.container or "",
                                                   cpu=args.cpu or "", memory=args.memory or ""),
                                 timeout=30)
        if self.fmt != "table":
            self.show([reply.pod], single=True)
        else:
            print(f"pod/{reply.pod.name} resized")

    def logs(self, args: argparse.Namespace) -> None:
        req = npb.LogsRequest(name=args.name, container=args.container or "", follow=args.follow,
                              tail=args.tail if args.tail is not None else 0,
                              since_unix_nano=logs_cli.since_unix_nano(args), timestamps=args.timestamps)
        out = sys.stdout.buffer
        for chunk in self.stub.Logs(req, timeout=None if args.follow else 30):
            out.write(chunk.data)
            out.flush()

    def node(self, args: argparse.Namespace) -> None:
        info = self.stub.NodeInfo(npb.NodeInfoRequest(), timeout=10)
        data = {"resources": json.loads(info.resources_json), "realtime": json.loads(info.realtime_json),
                "proxy": json.loads(info.proxy_json) if info.proxy_json else None}
        if self.json:
            self.print_doc(data)
            return
        res, rt = data["resources"], data["realtime"]
        print(f"node {res.get('id')}: {res.get('cpu')} cpus, {res.get('memory', 0) // 2**20} MiB, "
              f"{res.get('distrib')} {res.get('version')} {res.get('arch')}")
        cpu, mem = rt.get("cpu", {}), rt.get("memory", {})
        print(f"cpu {cpu.get('currentUsage')}%  memory {mem.get('currentUsage')}%")
        print(proxy_line(data["proxy"]))

    def image(self, args: argparse.Namespace) -> None:
        {"ls": self._image_ls, "list": self._image_ls, "pull": self._image_pull,
         "import": self._image_import, "rm": self._image_rm}[args.action](args)

    def _image_ls(self, args: argparse.Namespace) -> None:
        images = self.stub.ListImages(npb.ListImagesRequest(), timeout=30).images
        output.emit(pods.image_listing(), images, self.fmt)

    def _image_pull(self, args: argparse.Namespace) -> None:
        for ref in args.refs:
            pull.show(ref, self.stub.PullImage(npb.PullImageRequest(image=ref)))

    def _image_import(self, args: argparse.Namespace) -> None:
        def chunks() -> Any:
            with open(args.refs[0], "rb") if args.refs[0] != "-" else sys.stdin.buffer as fh:
                while data := fh.read(512 * 1024):  # under the API's 1 MiB message cap
                    yield npb.ImageChunk(data=data)
        if len(args.refs) != 1:
            raise InvalidArgument("give one archive file (or - for standard input)", "FILE")
        for name in self.stub.ImportImage(chunks(), timeout=600).images:
            print(name)

    def _image_rm(self, args: argparse.Namespace) -> None:
        for ref in args.refs:
            print(f"deleted {self.stub.RemoveImage(npb.RemoveImageRequest(image=ref), timeout=30).image}")

    def volume(self, args: argparse.Namespace) -> None:
        volume.run(self.stub, args, self.fmt)

    def watch(self, args: argparse.Namespace) -> None:
        for ev in self.stub.Watch(npb.WatchRequest(name=args.name or "")):
            if self.json:
                print(json.dumps({"kind": ev.kind, "seq": ev.seq, "pod": pod_json(ev.pod)}), flush=True)
            else:
                print(f"{ev.kind:9} {ev.pod.name:20} {ev.pod.phase} {ev.pod.reason}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rikletctl", description="Drive a riklet node agent.")
    connect.add_flags(p)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, fn: Callable[[Ctl, argparse.Namespace], int | None], helptext: str,
            aliases: Sequence[str] = (), output: bool | Sequence[str] = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, aliases=list(aliases))
        sp.set_defaults(fn=fn)
        if output:
            sp.add_argument("-o", "--output", choices=FORMATS if output is True else output, default="table")
        return sp

    sp = add("apply", Ctl.apply, "create or update a workload from a JSON or YAML file", output=True)
    sp.add_argument("-f", "--filename", required=True, help="file, or - for standard input")
    sp = add("run", Ctl.run, "run a one-container workload: a process, or an --image", output=True)
    sp.add_argument("name")
    sp.add_argument("--image", help="container image (containerd runtime); CMD replaces its command")
    sp.add_argument("--host-network", action="store_true", help="share the node's network (images)")
    sp.add_argument("--port", action="append", default=[], help="HOST:TARGET[/tcp|/udp]")
    sp.add_argument("--env", "-e", action="append", default=[], help="K=V")
    sp.add_argument("--cpu", help="cores, e.g. 0.5")
    sp.add_argument("--memory", help="bytes, e.g. 64m")
    sp.add_argument("--restart", choices=RESTART_POLICIES, default="Always")
    sp.add_argument("--grace", type=float, help="seconds between SIGTERM and SIGKILL on stop")
    sp.add_argument("--workdir", help="working directory (absolute)")
    sp.add_argument("--container", help="container name (default: NAME)")
    sp.set_defaults(command=[])  # what follows "--" (split off before parsing)
    sp = add("get", Ctl.get, "show pods", output=True)
    sp.add_argument("what", choices=["pods", "pod", "po", "apps", "app"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("-w", "--watch", action="store_true", help="then a row for each change (pods)")
    sp.add_argument("--watch-only", action="store_true", help="only the changes, no table first")
    sp = add("delete", Ctl.delete, "stop and remove pods", aliases=["rm"])
    sp.add_argument("names", nargs="*", metavar="[pod|app] NAME")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every pod on the node")
    which.add_argument("--workload", metavar="NAME", help="every pod of a workload")
    sp = add("stop", Ctl.stop, "stop pods, keeping them (apply starts them again)")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp = add("resize", Ctl.resize, "change a container's cpu/memory limits in place (no restart)",
             output=True)
    sp.add_argument("name")
    sp.add_argument("-c", "--container")
    sp.add_argument("--cpu", help="cores, e.g. 1 or 500m")
    sp.add_argument("--memory", help="bytes, e.g. 256m")
    sp = add("logs", Ctl.logs, "print a container's output")
    sp.add_argument("name")
    sp.add_argument("-c", "--container")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--tail", type=int)
    logs_cli.add_arguments(sp)
    add("node", Ctl.node, "node resources and usage", output=DOCS)
    sp = add("image", Ctl.image, "containerd images: ls, pull REF, import FILE, rm REF", aliases=["images"],
             output=True)
    sp.add_argument("action", choices=["ls", "list", "pull", "import", "rm"])
    sp.add_argument("refs", nargs="*", metavar="REF|FILE")
    volume.add_parser(sub, add, Ctl.volume)
    sp = add("watch", Ctl.watch, "stream pod changes", output=("table", "json"))
    sp.add_argument("name", nargs="?")
    exec_cli.register(add)
    events_cli.register(add)
    connect.register(add)
    completion.register(add, sub)
    connect.add_to_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["__complete"]:   # the completion scripts' question (cli/completion.py)
        return completion.complete(parser, argv[1:])
    command: list[str] = []
    if "--" in argv:  # everything after "--" is the workload's argv, flags included
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.cmd in ("run", "exec"):
        args.command = command
    elif command:
        parser.error("'--' only goes with run and exec")
    if args.cmd in ("delete", "rm"):
        if args.names and args.names[0] in ("pod", "pods", "po", "app", "apps"):
            args.names = args.names[1:]
        if bool(args.names) == bool(args.all or args.workload):
            parser.error("delete: give pod names, or --all, or --workload NAME")
    if args.cmd in ("image", "images") and args.action in ("pull", "import", "rm") and not args.refs:
        parser.error(f"image {args.action}: give {'a file' if args.action == 'import' else 'an image'}")
    if args.cmd in ("volume", "volumes"):
        volume.check_args(parser, args)
    if args.cmd == "get" and args.what == "pod" and not args.name:
        parser.error("get pod: give a pod name")
    if args.cmd == "get" and (args.watch or args.watch_only) and args.what in ("apps", "app"):
        parser.error("get -w: watches pods")
    target: connect.Target | None = None
    try:
        if not getattr(args, "local", False):   # `config` and `completion` talk to no agent
            target = connect.resolve(args, default_token_file)
        fmt = getattr(args, "output", "table")
        ctl = Ctl(target.endpoint, fmt, target.token, target.tls) if target else None
        code = args.fn(ctl, args)
    except InvalidArgument as exc:
        print(f"rikletctl: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"rikletctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        code = exc.code()
        print(f"rikletctl: {code.name.lower()}: {exc.details()}", file=sys.stderr)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            print("rikletctl: the agent wants its API token: run as a user who can read "
                  f"{target.token_file if target else default_token_file()}, or set RIKLET_TOKEN / "
                  "--token-file",
                  file=sys.stderr)
        return 3 if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
