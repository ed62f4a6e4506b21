// The reference load of `make load` for teams that use k6: Open Inference Protocol requests for
// the tiny model (x: FP32 [1, 16]) on the bridge, at a rate that ramps up, holds and ramps down,
// with the same thresholds. Run: k6 run -e BRIDGE=127.0.0.1:8000 infra/load/inference.js
// (-e API_KEY=... when the bridge requires authentication).
//
// `options` is written as plain JSON: tests/unit/test_load_thresholds.py parses it and checks that
// its stages and thresholds are the ones of the Makefile's `load` target, so the two cannot drift.
// Where the figures differ in definition: `inferstream load` counts latency from each request's
// due time (k6 from its send) and counts dropped requests as failures (k6 reports them apart, as
// dropped_iterations); both count only ok requests in the latency percentiles.

import http from "k6/http";
import { Counter } from "k6/metrics";

const BRIDGE = __ENV.BRIDGE || "127.0.0.1:8000";
const INFER_URL = `http://${BRIDGE}/v2/models/tiny/infer`;
const ok = new Counter("inferstream_ok");

export const options = {
  "scenarios": {
    "inference": {
      "executor": "ramping-arrival-rate",
      "startRate": 0,
      "timeUnit": "1s",
      "preAllocatedVUs": 50,
      "maxVUs": 1000,
      "stages": [
        {"duration": "10s", "target": 50},
        {"duration": "30s", "target": 50},
        {"duration": "10s", "target": 0}
      ]
    }
  },
  "thresholds": {
    "http_req_failed": ["rate<=0.01"],
    "http_req_duration{expected_response:true}": ["p(95)<=500", "p(99)<=1000"],
    "inferstream_ok": ["rate>=35"]
  }
};

const headers = {"Content-Type": "application/json", "X-Inferstream-Timeout": "10"};
if (__ENV.API_KEY) {
  headers["X-API-Key"] = __ENV.API_KEY;
}

export default function () {
  const data = Array.from({length: 16}, () => Math.random() * 2 - 1);
  const body = JSON.stringify({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": data}]});
  const response = http.post(INFER_URL, body, {headers: headers, timeout: "11s"});
  if (response.status === 200) {
    ok.add(1);
  }
}
