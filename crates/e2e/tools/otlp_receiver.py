"""An OTLP trace receiver for the end-to-end tests, built on the official
OpenTelemetry protos (`opentelemetry-proto`) and `grpcio`: it takes
ExportTraceServiceRequest over gRPC and over HTTP/protobuf (POST
/v1/traces) and writes every span it decodes as one JSON line.

    otlp_receiver.py GRPC_PORT HTTP_PORT OUT_FILE
"""

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def record(req, protocol, out):
    lines = []
    for rs in req.resource_spans:
        resource = {a.key: value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "protocol": protocol,
                    "service": resource.get("service.name"),
                    "instance": resource.get("service.instance.id"),
                    "scope": ss.scope.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "status": s.status.code,
                    "attributes": {a.key: value(a.value) for a in s.attributes},
                    "events": [e.name for e in s.events],
                }))
    with LOCK:
        with open(out, "a") as f:
            for line in lines:
                f.write(line + "\n")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        record(request, "grpc", self.out)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    grpc_port, http_port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(out), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                self.send_response(404)
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            record(req, "http", out)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", http_port), Handler)
    print("ready", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
