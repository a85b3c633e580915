-- Request generator for every benchmark run; one script so that the bare
-- baseline pays the same load-generator cost as the runs it is compared to.
--
-- WORKLOAD (env):
--   new     a unique Idempotency-Key per request (first executions)
--   replay  REPLAY_KEYS fixed keys (default 64), same body: after the first
--           request per key, every request is a replay
--   mix     alternates: one new key, one replayed key
--   dup     groups of DUP_GROUP (default 16) consecutive requests of a thread
--           share a key; a thread's 16 connections send them concurrently
--   nokey   no Idempotency-Key header at all
-- COOKIE (env, optional): sent as the Cookie header (session-based peers).
--
-- done() prints one line: RESULT requests=.. seconds=.. rps=.. p50_us=..
-- p99_us=.. non2xx=.. socket_errors=..

local workload = os.getenv("WORKLOAD") or "new"
local cookie = os.getenv("COOKIE")
local replay_keys = tonumber(os.getenv("REPLAY_KEYS") or "64")
local dup_group = tonumber(os.getenv("DUP_GROUP") or "16")
local body = '{"amount":1999,"currency":"EUR","reference":"order-2026-11-22-000123"}'

local next_thread = 1
function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
end

local counter = 0
local prefix
local headers

function init(args)
  -- A per-run, per-thread prefix keeps keys unique across threads; the
  -- keys are 36 characters, the length of a UUID.
  prefix = string.format("%08x-%04x-", os.time() % 0x7fffffff, thread_id or 0)
  headers = {
    ["Content-Type"] = "application/json",
    ["X-Api-Key"] = "bench-api-key",
  }
  if cookie and cookie ~= "" then
    headers["Cookie"] = cookie
  end
end

local function new_key()
  return string.format("%s%022d", prefix, counter)
end

local function replay_key()
  return string.format("replay-%029d", counter % replay_keys)
end

function request()
  counter = counter + 1
  if workload == "new" then
    headers["Idempotency-Key"] = new_key()
  elseif workload == "replay" then
    headers["Idempotency-Key"] = replay_key()
  elseif workload == "mix" then
    if counter % 2 == 0 then
      headers["Idempotency-Key"] = new_key()
    else
      headers["Idempotency-Key"] = replay_key()
    end
  elseif workload == "dup" then
    headers["Idempotency-Key"] =
      string.format("%sdup%019d", prefix, math.floor(counter / dup_group))
  elseif workload == "nokey" then
    headers["Idempotency-Key"] = nil
  else
    error("unknown WORKLOAD " .. workload)
  end
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f rps=%.1f p50_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50), latency:percentile(99), errors.status,
    errors.connect + errors.read + errors.write + errors.timeout))
end
