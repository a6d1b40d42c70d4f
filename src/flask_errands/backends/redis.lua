-- Scripts of the Redis backend, one per atomic operation, run by name with EVALSHA.
-- Each script is the `common` block followed by its own block; ARGV[1] is the key prefix.
-- KEYS[1] is the prefix too: on a Redis Cluster it names the hash slot (the prefix is a
-- hash tag there, `{errands}:`) whose master runs the script. Every key below is the
-- prefix and a suffix, so all of one store's keys are in that slot. They cannot all be
-- declared in KEYS: a script finds most of them itself (the ids a reserve claims, a
-- job's queue, a workflow's next steps), and a caller that looked them up first would
-- lose the atomicity. Redis refuses a script that touches a key of another node.
-- Wake-ups are PUBLISH on one server and SPUBLISH (sharded, same slot) on a cluster.
-- Floats travel as Python's repr() text and are stored as given, so they read back exact;
-- a script never returns a float as a Lua number (Redis would truncate it to an integer).
--
-- Keys, all under the prefix:
--   job:<id>              hash: the record's fields (None fields absent), plus seq and batch
--   seq                   counter: enqueue order, for listing and for ties in reserve order
--   queues                set: names of queues that hold jobs
--   idx:<queue>:<status>  zset seq -> id: listing and counts
--   prios:<queue>         set: priorities that have waiting jobs in the queue
--   wait:<queue>:<prio>   zset eta -> <seq as %016d><id>: waiting jobs, in reserve order
--   leases:<queue>        zset lease_expires_at -> id: running jobs
--   finished              zset finished_at -> id: what prune deletes
--   unique:<key>          string: the id of the job that holds the unique key
--   schedules             set of schedule names; ticks:<name> zset fire_time -> fire_time text,
--   tickfired:<name>      zset fired_at -> fire_time text, tickjob:<name> hash fire_time -> id
--   workers               zset expires_at -> worker id; workerinfo hash id -> JSON
--   paused                set: names of paused queues (reserve and next_eta skip them)
--   schedstates           set of schedule names changed at run time; schedstate:<name> hash
--                         paused ('1' or '0'), every and since (float text), cron
--   finished:<minute>     hash "<queue>\n<task>\n<outcome>" -> attempts that ended so in
--                         that minute (Unix time // 60); finishedminutes zset of its minutes
--   enqueued              hash "<queue>\n<task>" -> jobs stored since the store began
--   timings               hash "both\n<queue>\n<task>\n<d>,<w>" -> attempts whose duration
--                         fell in bucket d and wait in bucket w (indexes into
--                         base.TIMING_BOUNDS, its length for +Inf; one count for both
--                         histograms, one command less per job; stores written before kept
--                         "<timing>\n<queue>\n<task>\n<bucket>", still read), and
--                         "<timing>\n<queue>\n<task>\nusum" -> their sum in whole microseconds
--                         (an integer: HINCRBY, no float text to print per job; stores
--                         written before kept "...\nsum", float seconds); never expire
--   depth:<minute>        string: JSON [[queue, status, n], ...] sampled once in the minute;
--                         depthminutes zset of its minutes
--   limit:starts:<key>    list: the latest starts of a rate-limited task or queue, newest
--                         first, as many as its limit (flask_errands.limits)
--   limit:running:<key>   zset lease expiry -> id: the running jobs of a task with a
--                         concurrency limit (those under a live lease count), so a claim
--                         counts them with one ZCOUNT instead of reading every running job
--   wake                  pub/sub channel: new work may be due

-- name: common
local P = ARGV[1]
local WAITING = {queued = true, scheduled = true}
local FINISHED = {succeeded = true, failed = true, cancelled = true}
local STATUSES = {'blocked', 'queued', 'scheduled', 'running', 'succeeded', 'failed', 'cancelled'}
local STATE = {'status', 'queue', 'priority', 'seq', 'unique_key', 'lease_token', 'eta', 'task',
               'started_at', 'flow', 'limits'}

local function job_key(id) return P .. 'job:' .. id end
local function idx_key(queue, status) return P .. 'idx:' .. queue .. ':' .. status end
local function prios_key(queue) return P .. 'prios:' .. queue end
local function wait_key(queue, prio) return P .. 'wait:' .. queue .. ':' .. prio end
local function lease_key(queue) return P .. 'leases:' .. queue end
local function unique_key(key) return P .. 'unique:' .. key end
local function inputs_key(id) return P .. 'inputs:' .. id end
local function running_key(key) return P .. 'limit:running:' .. key end

-- Set (at expiry) or drop (expiry nil) a running job in the running sets of its task's
-- concurrency limits; limits is its limits JSON, or nil. A queue's running jobs are its
-- leases already.
local function mark_running(limits, id, expiry)
  if not limits then return end
  for _, lim in ipairs(cjson.decode(limits)) do
    if tonumber(lim[4]) and string.sub(lim[1], 1, 5) == 'task:' then
      if expiry then
        redis.call('ZADD', running_key(lim[1]), expiry, id)
      else
        redis.call('ZREM', running_key(lim[1]), id)
      end
    end
  end
end
local function member(seq, id) return string.format('%016d', seq) .. id end
local function prio(value) return string.format('%d', tonumber(value) or 0) end

-- The fields that say where a job is indexed, or nil when there is no such job.
local function state(id)
  local v = redis.call('HMGET', job_key(id), unpack(STATE))
  if not v[1] then return nil end
  return {id = id, status = v[1], queue = v[2] or 'default', prio = prio(v[3]),
          seq = tonumber(v[4]) or 0, unique = v[5], token = v[6], eta = v[7] or '0',
          task = v[8] or '', started = v[9], flow = v[10], limits = v[11]}
end

local function index(job, status)
  if job.status ~= status then redis.call('ZREM', idx_key(job.queue, job.status), job.id) end
  redis.call('ZADD', idx_key(job.queue, status), job.seq, job.id)
end

local function add_waiting(job, eta)
  redis.call('ZADD', wait_key(job.queue, job.prio), eta, member(job.seq, job.id))
  redis.call('SADD', prios_key(job.queue), job.prio)
end

local function remove_waiting(job)
  redis.call('ZREM', wait_key(job.queue, job.prio), member(job.seq, job.id))
end

local function live_holder(key)
  local holder = redis.call('GET', unique_key(key))
  if holder then
    local status = redis.call('HGET', job_key(holder), 'status')
    if WAITING[status] or status == 'running' then return holder end
  end
  return false
end

local function forget_unique(job)
  if job.unique and redis.call('GET', unique_key(job.unique)) == job.id then
    redis.call('DEL', unique_key(job.unique))
  end
end

-- Make a waiting or running job finished; its record expires after ttl seconds.
local function end_job(job, status, now, ttl)
  index(job, status)
  redis.call('HSET', job_key(job.id), 'status', status, 'finished_at', now)
  redis.call('ZADD', P .. 'finished', now, job.id)
  redis.call('EXPIRE', job_key(job.id), ttl)
  if job.flow then redis.call('EXPIRE', inputs_key(job.id), ttl) end  -- only steps have inputs
  forget_unique(job)
end

local function delete_job(job)
  redis.call('ZREM', idx_key(job.queue, job.status), job.id)
  remove_waiting(job)
  redis.call('ZREM', lease_key(job.queue), job.id)
  redis.call('ZREM', P .. 'finished', job.id)
  forget_unique(job)
  redis.call('DEL', job_key(job.id), inputs_key(job.id))
end

local function wake(queue) redis.call('PUBLISH', P .. 'wake', queue) end

-- The steps a workflow step feeds (Flow.next: {id, position} pairs), or nil if it is none.
local function flow_links(id)
  local flow = redis.call('HGET', job_key(id), 'flow')
  if not flow then return nil end
  return cjson.decode(flow)['next']
end

-- The steps reachable through links (and theirs) in status, whose error starts with prefix.
local function downstream(links, status, prefix)
  local found, seen, pending = {}, {}, {}
  for _, link in ipairs(links) do pending[#pending + 1] = link[1] end
  while #pending > 0 do
    local id = table.remove(pending)
    if not seen[id] then
      seen[id] = true
      local step = state(id)
      local error = prefix and (redis.call('HGET', job_key(id), 'error') or '')
      if step and step.status == status and (not prefix or string.sub(error, 1, #prefix) == prefix) then
        found[#found + 1] = step
        for _, link in ipairs(flow_links(id) or {}) do pending[#pending + 1] = link[1] end
      end
    end
  end
  return found
end

-- Move the workflow of a step (a state()) that just ended on (Backend.finish); true if a step
-- fell due. template is the UpstreamFailed error, with {job}, {task} and {ended} to fill in.
local function advance(job, status, now, ttl, template)
  if not job.flow then return false end  -- not a workflow step: no read at all
  local id, links = job.id, cjson.decode(job.flow)['next']
  if not links then return false end
  if status == 'succeeded' then
    local result = redis.call('HGET', job_key(id), 'result') or 'null'
    local due = false
    for _, link in ipairs(links) do
      local step_id = link[1]
      local step = state(step_id)
      if step and redis.call('HSETNX', inputs_key(step_id), tostring(link[2]), result) == 1 then
        -- One input fewer is missing, whatever its status: a cancelled step may be revived.
        local left = redis.call('HINCRBY', job_key(step_id), 'blocked_by', -1)
        if FINISHED[step.status] then redis.call('EXPIRE', inputs_key(step_id), ttl) end
        if step.status == 'blocked' and left <= 0 then
          local next_status = tonumber(step.eta) > tonumber(now) and 'scheduled' or 'queued'
          index(step, next_status)
          redis.call('HSET', job_key(step_id), 'status', next_status)
          add_waiting(step, step.eta)
          wake(step.queue)
          due = true
        end
      end
    end
    return due
  end
  if status ~= 'failed' and status ~= 'cancelled' then return false end
  local fill = {job = id, task = redis.call('HGET', job_key(id), 'task') or '?',
                ended = status == 'cancelled' and 'was cancelled' or 'failed'}
  local error = (string.gsub(template, '{(%a+)}', fill))
  for _, step in ipairs(downstream(links, 'blocked')) do
    end_job(step, 'cancelled', now, ttl)
    redis.call('HSET', job_key(step.id), 'error', error)
  end
  return false
end

-- An ARGV block of fields: n, then n field/value pairs to set, then m, then m fields to
-- delete. Returns the two as arrays, to send with whatever else the script writes.
local function field_block(pos)
  local n = tonumber(ARGV[pos])
  local sets = {unpack(ARGV, pos + 1, pos + 2 * n)}
  pos = pos + 2 * n + 1
  return sets, {unpack(ARGV, pos + 1, pos + tonumber(ARGV[pos]))}
end

-- New jobs arrive as one JSON array (one ARGV, so packing costs little) of
-- [id, queue, priority, status, eta, unique key or null, [field, value, ...]], all text.
local function parse_jobs(text)
  local jobs = cjson.decode(text)
  for i, job in ipairs(jobs) do
    jobs[i] = {id = job[1], queue = job[2], prio = prio(job[3]), status = job[4], eta = job[5],
               unique = job[6] ~= cjson.null and job[6], fields = job[7], task = job[7][4]}
  end
  return jobs
end

-- Ids already stored by this same call (a retry after a lost reply), or nil and a taken id.
local function replayed_ids(jobs, nonce)
  local seen, replayed, keys = {}, {}, {}
  for i, job in ipairs(jobs) do
    if seen[job.id] then return nil, job.id end
    seen[job.id] = true
    keys[i] = job_key(job.id)
  end
  local taken = 0
  for k = 1, #keys, 1000 do  -- one EXISTS for many keys: usually none is taken
    taken = taken + redis.call('EXISTS', unpack(keys, k, math.min(k + 999, #keys)))
  end
  if taken == 0 then return replayed end
  for _, job in ipairs(jobs) do
    if redis.call('EXISTS', job_key(job.id)) == 1 then
      if redis.call('HGET', job_key(job.id), 'batch') ~= nonce then return nil, job.id end
      replayed[job.id] = true
    end
  end
  return replayed
end

-- Index writes of new jobs, sent per key once the whole batch is stored; and how many jobs
-- of each queue and task were stored.
local pending, known, stored = {}, {}, {}

local function later(command, key, ...)
  local args = pending[key]
  if not args then
    args = {command}
    pending[key] = args
  end
  for _, value in ipairs({...}) do args[#args + 1] = value end
end

local function write_pending()
  for key, args in pairs(pending) do
    for k = 2, #args, 1000 do
      redis.call(args[1], key, unpack(args, k, math.min(k + 999, #args)))
    end
  end
  pending = {}
  for field, n in pairs(stored) do redis.call('HINCRBY', P .. 'enqueued', field, n) end
  stored = {}
end

local function add_once(key, value)
  if not known[key .. '\0' .. value] then
    known[key .. '\0' .. value] = true
    later('SADD', key, value)
  end
end

-- Store one new job under job.seq; returns 0, or the record of the live job holding its
-- unique key. Its indexes are written by write_pending().
local function insert(job, nonce)
  if job.unique then
    local holder = live_holder(job.unique)
    if holder then return redis.call('HGETALL', job_key(holder)) end
  end
  redis.call('HSET', job_key(job.id), 'seq', job.seq, 'batch', nonce, unpack(job.fields))
  if job.unique then redis.call('SET', unique_key(job.unique), job.id) end
  add_once(P .. 'queues', job.queue)
  add_once(prios_key(job.queue), job.prio)
  later('ZADD', idx_key(job.queue, job.status), job.seq, job.id)
  local counted = job.queue .. '\n' .. job.task
  stored[counted] = (stored[counted] or 0) + 1
  if job.status ~= 'blocked' then
    later('ZADD', wait_key(job.queue, job.prio), job.eta, member(job.seq, job.id))
  end
  return 0
end

-- Give the jobs enqueue order: one counter increment for the whole batch.
local function number(jobs)
  local last = redis.call('INCRBY', P .. 'seq', #jobs)
  for i, job in ipairs(jobs) do job.seq = last - #jobs + i end
end

local function queues_from(pos)
  if #ARGV >= pos then return {unpack(ARGV, pos)} end
  return redis.call('SMEMBERS', P .. 'queues')
end

-- The queues of queues_from(pos) that are not paused.
local function serving_from(pos)
  if #ARGV < pos then return redis.call('SDIFF', P .. 'queues', P .. 'paused') end
  local queues = queues_from(pos)
  if redis.call('SCARD', P .. 'paused') == 0 then return queues end
  local serving = {}
  for _, queue in ipairs(queues) do
    if redis.call('SISMEMBER', P .. 'paused', queue) == 0 then serving[#serving + 1] = queue end
  end
  return serving
end

-- The upper bounds of the timings' buckets: base.TIMING_BOUNDS.
local BOUNDS = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
-- Their indexes as text (a number turned into text goes through sprintf).
local BUCKETS = {'0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14',
                 '15'}

-- The bucket of seconds (an index into BOUNDS, its length for +Inf), as text.
local function bucket_of(seconds)
  for i = 1, #BOUNDS do
    if seconds <= BOUNDS[i] then return BUCKETS[i] end
  end
  return BUCKETS[#BOUNDS + 1]
end

-- Add one attempt that ended with outcome at now to the count of now's minute (text, or nil
-- to work it out), and its duration (start to now) and wait (eta to start) to their
-- histograms. timed is {"<duration bucket>,<wait bucket>", duration us, wait us} as the
-- caller worked them out from the claim (redis.py, _timed), or nil to work them out here:
-- number text costs the server more than the caller. The minute is kept until prune or
-- sample_depth folds it into minute 0: never expired, so the counts since the store began
-- stay whole.
local function count_finished(job, outcome, now, minute, timed)
  minute = minute or tostring(math.floor(tonumber(now) / 60))
  local field = job.queue .. '\n' .. job.task .. '\n'
  if redis.call('HINCRBY', P .. 'finished:' .. minute, field .. outcome, 1) == 1 then
    redis.call('ZADD', P .. 'finishedminutes', minute, minute)
  end
  if not timed then
    now = tonumber(now)
    local started = tonumber(job.started) or now
    local duration = math.max(now - started, 0)
    local wait = math.max(started - (tonumber(job.eta) or started), 0)
    timed = {bucket_of(duration) .. ',' .. bucket_of(wait), math.floor(duration * 1e6 + 0.5),
             math.floor(wait * 1e6 + 0.5)}
  end
  local timings = P .. 'timings'
  redis.call('HINCRBY', timings, 'both\n' .. field .. timed[1], 1)
  redis.call('HINCRBY', timings, 'duration\n' .. field .. 'usum', timed[2])
  redis.call('HINCRBY', timings, 'wait\n' .. field .. 'usum', timed[3])
end

-- Fold the per-minute counts of the minutes before cut (a ZRANGEBYSCORE bound) into minute 0.
local function fold_finished(cut)
  for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finishedminutes', '(0', cut)) do
    local counts = redis.call('HGETALL', P .. 'finished:' .. minute)
    for k = 1, #counts, 2 do redis.call('HINCRBY', P .. 'finished:0', counts[k], counts[k + 1]) end
    if #counts > 0 then redis.call('ZADD', P .. 'finishedminutes', 0, '0') end
    redis.call('DEL', P .. 'finished:' .. minute)
    redis.call('ZREM', P .. 'finishedminutes', minute)
  end
end

-- name: enqueue
-- ARGV: prefix, nonce, jobs.
local nonce = ARGV[2]
local jobs = parse_jobs(ARGV[3])
local replayed, taken = replayed_ids(jobs, nonce)
if not replayed then return redis.error_reply('ERRANDS job id already stored: ' .. taken) end
number(jobs)
local out = {}
for i, job in ipairs(jobs) do
  out[i] = replayed[job.id] and 0 or insert(job, nonce)
end
write_pending()
if #jobs > 0 then wake(jobs[1].queue) end
return out

-- name: reserve
-- ARGV: prefix, now, lease expiry, worker id, limit, token prefix, max lost leases, 1 if this
-- is a retry of the call (else 0), then queues (none: all). Returns id, record pairs: expired leases first, then due jobs in
-- priority, eta, seq order; then id, nil pairs for the expired jobs that have now lost max
-- lost leases in a row, not claimed: the give_up script fails them. That path is rare, and
-- kept out of this script its helpers cost the common claim nothing.
local now, expires, worker, token = ARGV[2], ARGV[3], ARGV[4], ARGV[6]
local limit, max_lost = tonumber(ARGV[5]), tonumber(ARGV[7])
local claimed, given_up = {}, {}

-- A call retried after its reply was lost gets what the first run claimed, not more: the
-- jobs it leased until exactly its lease expiry, under its token, in claim order. Nobody
-- else knows them yet, so nothing has moved their lease since.
if ARGV[8] == '1' then
  local found = {}
  for _, queue in ipairs(queues_from(9)) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', lease_key(queue), expires, expires)) do
      local held = redis.call('HMGET', job_key(id), 'status', 'lease_token')
      if held[1] == 'running' and held[2] and string.sub(held[2], 1, #token) == token then
        found[#found + 1] = {tonumber(string.sub(held[2], #token + 1)), id}
      end
    end
  end
  if #found > 0 then
    table.sort(found, function(a, b) return a[1] < b[1] end)
    local out = {}
    for _, pair in ipairs(found) do
      out[#out + 1] = pair[2]
      out[#out + 1] = redis.call('HGETALL', job_key(pair[2]))
    end
    return out
  end
end

local queues = serving_from(9)

-- Limits (flask_errands.limits): a job's limits JSON, checked against its task's (or
-- queue's) running jobs under a live lease and its starts in the last window, a list per
-- key (newest first, the latest N kept). held: key -> true; free_at: when one may start.
local held, running, free_at = {}, {}, nil
local function hold(key, at)
  held[key] = true
  if not free_at or at < free_at then free_at = at end
  return false
end
local function running_of(kind, name, key)
  if kind == 'queue' then return redis.call('ZCOUNT', lease_key(name), '(' .. now, '+inf') end
  return redis.call('ZCOUNT', running_key(key), '(' .. now, '+inf')
end
local function admit(text, id)
  if not text then return true end
  local limits = cjson.decode(text)
  for _, lim in ipairs(limits) do
    local key, rate, per, conc = lim[1], tonumber(lim[2]), tonumber(lim[3]), tonumber(lim[4])
    if held[key] then return false end
    if conc then
      if not running[key] then
        local kind, name = string.match(key, '^(%a+):(.*)$')
        running[key] = running_of(kind, name, key)
      end
      if running[key] >= conc then return hold(key, tonumber(now) + 0.1) end
    end
    if rate and per then
      -- The list keeps the latest ``rate`` starts: when full, its last is ``rate`` ago.
      -- Its ``rate``-th entry (nil while it holds fewer) is the oldest start that counts.
      local earlier = tonumber(redis.call('LINDEX', P .. 'limit:starts:' .. key, rate - 1))
      if earlier and earlier > tonumber(now) - per then return hold(key, earlier + per) end
    end
  end
  for _, lim in ipairs(limits) do
    local key, rate = lim[1], tonumber(lim[2])
    if tonumber(lim[4]) then
      running[key] = running[key] + 1
      if string.sub(key, 1, 5) == 'task:' then redis.call('ZADD', running_key(key), expires, id) end
    end
    if rate and tonumber(lim[3]) then
      local log = P .. 'limit:starts:' .. key
      if redis.call('LPUSH', log, now) > rate then redis.call('LTRIM', log, 0, rate - 1) end
      redis.call('PEXPIRE', log, math.ceil(tonumber(lim[3]) * 1000) + 1000)
    end
  end
  return true
end

local function claim(id, attempts, status_fields)
  redis.call('HSET', job_key(id), 'attempts', (tonumber(attempts) or 0) + 1, 'started_at', now,
             'lease_expires_at', expires, 'lease_token', token .. (#claimed + 1),
             'worker_id', worker, unpack(status_fields))
  claimed[#claimed + 1] = id
end

for _, queue in ipairs(queues) do
  if #claimed >= limit then break end
  local ids = redis.call('ZRANGEBYSCORE', lease_key(queue), '-inf', now,
                         'LIMIT', 0, limit - #claimed)
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', job_key(id), 'status', 'attempts', 'lost_leases', 'worker_id',
                         'limits')
    local lost = (tonumber(v[3]) or 0) + 1
    if v[1] ~= 'running' then
      redis.call('ZREM', lease_key(queue), id)
    elseif lost >= max_lost then
      given_up[#given_up + 1] = id  -- failed by the give_up script, on the rare path
    elseif admit(v[5] or nil, id) then
      redis.call('ZADD', lease_key(queue), expires, id)
      claim(id, v[2], {'lost_leases', lost})
    end
  end
end

-- Due jobs by priority, eta and seq; those held back by a limit stay where they are, and
-- the search goes on past them (looking further each round) until enough are claimed.
local weighed, fetch = {}, limit - #claimed
while limit - #claimed > 0 do
  local need = limit - #claimed
  local levels = {}
  for _, queue in ipairs(queues) do
    for _, p in ipairs(redis.call('SMEMBERS', prios_key(queue))) do
      if tonumber(p) then levels[#levels + 1] = {tonumber(p), queue, p} end
    end
  end
  table.sort(levels, function(a, b) return a[1] > b[1] end)
  -- Candidates from every level of the best priorities, until they are enough.
  local found, i, more = {}, 1, false
  while i <= #levels and #found < need do
    local level = levels[i][1]
    while i <= #levels and levels[i][1] == level do
      local queue, p = levels[i][2], levels[i][3]
      local key = wait_key(queue, p)
      local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, fetch)
      if #due == 0 and redis.call('EXISTS', key) == 0 then
        redis.call('SREM', prios_key(queue), p)
      end
      if #due >= 2 * fetch then more = true end
      for k = 1, #due, 2 do
        if not weighed[due[k]] then
          found[#found + 1] = {level, tonumber(due[k + 1]), due[k], queue, key}
        end
      end
      i = i + 1
    end
  end
  if i <= #levels then more = true end
  table.sort(found, function(a, b)
    if a[1] ~= b[1] then return a[1] > b[1] end
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
  local skipped = 0
  for k = 1, #found do
    if #claimed >= limit then break end
    local _, _, m, queue, key = unpack(found[k])
    local id = string.sub(m, 17)
    weighed[m] = true
    local v = redis.call('HMGET', job_key(id), 'status', 'attempts', 'limits')
    if WAITING[v[1]] and not admit(v[3] or nil, id) then
      skipped = skipped + 1
    else
      redis.call('ZREM', key, m)
      if WAITING[v[1]] then
        redis.call('ZREM', idx_key(queue, v[1]), id)
        redis.call('ZADD', idx_key(queue, 'running'), tonumber(string.sub(m, 1, 16)), id)
        redis.call('ZADD', lease_key(queue), expires, id)
        claim(id, v[2], {'status', 'running'})
      end
    end
  end
  if skipped == 0 or not more then break end
  fetch = fetch * 2 + skipped
end

local out = {}
for _, id in ipairs(claimed) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', job_key(id))
end
for _, id in ipairs(given_up) do
  out[#out + 1] = id
  out[#out + 1] = false
end
if free_at then
  out[#out + 1] = ''
  out[#out + 1] = string.format('%.17g', free_at)
end
return out

-- name: give_up
-- ARGV: prefix, now, max lost leases, ttl, worker-lost error template, upstream-failed error
-- template, then the ids a reserve left to fail. Fails each job still running under a lease
-- expired at now, whose workers have died under it max lost leases times in a row (its task
-- kills them). Returns id, record pairs of those it failed.
local now, max_lost, ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local job = state(id)
  local expiry = job and redis.call('ZSCORE', lease_key(job.queue), id)
  local v = redis.call('HMGET', job_key(id), 'attempts', 'lost_leases', 'worker_id')
  local lost = (tonumber(v[2]) or 0) + 1
  if job and job.status == 'running' and expiry and tonumber(expiry) <= tonumber(now)
     and lost >= max_lost then
    local fill = {worker = v[3] or '?', attempt = v[1] or '0', lost = tostring(lost)}
    local error = (string.gsub(ARGV[5], '{(%a+)}', fill))
    redis.call('ZREM', lease_key(job.queue), id)
    mark_running(job.limits, id, nil)
    redis.call('HDEL', job_key(id), 'lease_expires_at', 'lease_token', 'traceback')
    redis.call('HSET', job_key(id), 'lost_leases', lost, 'error', error)
    count_finished(job, 'failed', now)
    end_job(job, 'failed', now, ttl)
    advance(job, 'failed', now, ttl, ARGV[6])
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGETALL', job_key(id))
  end
end
return out

-- name: limit_usage
-- ARGV: prefix, now, then key, kind, name, per ('' for no rate) for each limit. Returns
-- running, starts in the window, for each.
local now, out = tonumber(ARGV[2]), {}
for i = 3, #ARGV, 4 do
  local key, kind, name, per = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local n = 0
  local names = kind == 'queue' and {name} or redis.call('SMEMBERS', P .. 'queues')
  for _, queue in ipairs(names) do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', lease_key(queue), '(' .. now, '+inf')) do
      if kind == 'queue' or redis.call('HGET', job_key(id), 'task') == name then n = n + 1 end
    end
  end
  local recent = 0
  if per then
    for _, at in ipairs(redis.call('LRANGE', P .. 'limit:starts:' .. key, 0, -1)) do
      if tonumber(at) > now - per then recent = recent + 1 end
    end
  end
  out[#out + 1] = n
  out[#out + 1] = recent
end
return out

-- name: heartbeat
-- ARGV: prefix, lease expiry, then id, token pairs. Returns the ids whose cancel was requested.
local out = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local v = redis.call('HMGET', job_key(id), 'status', 'lease_token', 'cancel_requested', 'queue',
                       'limits')
  if v[1] == 'running' and v[2] == ARGV[i + 1] then
    redis.call('HSET', job_key(id), 'lease_expires_at', ARGV[2])
    redis.call('ZADD', lease_key(v[4] or 'default'), ARGV[2], id)
    mark_running(v[5] or nil, id, ARGV[2])
    if v[3] == '1' then out[#out + 1] = id end
  end
end
return out

-- name: set_progress
-- ARGV: prefix, id, then a fields block.
local key = job_key(ARGV[2])
if redis.call('EXISTS', key) == 1 then
  local sets, deletes = field_block(3)
  if #sets > 0 then redis.call('HSET', key, unpack(sets)) end
  if #deletes > 0 then redis.call('HDEL', key, unpack(deletes)) end
end
return 0

-- name: finish
-- ARGV: prefix, id, lease token, status, now, eta, ttl, upstream-failed error template, now's
-- minute, the attempt's timing buckets ('' to work them out here), duration us, wait us,
-- then a fields block. Returns 0 if not applied, 1 if applied, 2 if a workflow step fell due too.
local job = state(ARGV[2])
if not job or job.status ~= 'running' or job.token ~= ARGV[3] then return 0 end
local status, key = ARGV[4], job_key(job.id)
mark_running(job.limits, job.id, nil)
count_finished(job, status == 'scheduled' and 'retried' or status, ARGV[5], ARGV[9],
               ARGV[10] ~= '' and {ARGV[10], ARGV[11], ARGV[12]} or nil)
local sets, deletes = field_block(13)
redis.call('HDEL', key, 'lease_expires_at', 'lease_token', 'lost_leases', unpack(deletes))
redis.call('ZREM', lease_key(job.queue), job.id)
index(job, status)
if status == 'scheduled' then
  redis.call('HSET', key, 'status', status, 'eta', ARGV[6], unpack(sets))
  add_waiting(job, ARGV[6])
  wake(job.queue)
else
  redis.call('HSET', key, 'status', status, 'finished_at', ARGV[5], unpack(sets))
  redis.call('ZADD', P .. 'finished', ARGV[5], job.id)
  redis.call('EXPIRE', key, ARGV[7])
  if job.flow then redis.call('EXPIRE', inputs_key(job.id), ARGV[7]) end
  forget_unique(job)
  if advance(job, status, ARGV[5], ARGV[7], ARGV[8]) then return 2 end
end
return 1

-- name: release
-- ARGV: prefix, id, lease token. Returns 1 if applied.
local job = state(ARGV[2])
if not job or job.status ~= 'running' or job.token ~= ARGV[3] then return 0 end
local key = job_key(job.id)
local attempts = tonumber(redis.call('HGET', key, 'attempts')) or 1
redis.call('ZREM', lease_key(job.queue), job.id)
mark_running(job.limits, job.id, nil)
redis.call('HDEL', key, 'started_at', 'lease_expires_at', 'lease_token', 'worker_id',
           'lost_leases')
redis.call('HSET', key, 'status', 'queued', 'attempts', attempts - 1)
index(job, 'queued')
add_waiting(job, job.eta)
wake(job.queue)
return 1

-- name: cancel
-- ARGV: prefix, id, now, ttl, upstream-failed error template. Returns the record afterwards,
-- or nil.
local job = state(ARGV[2])
if not job then return false end
if WAITING[job.status] or job.status == 'blocked' then
  remove_waiting(job)
  end_job(job, 'cancelled', ARGV[3], ARGV[4])
  advance(job, 'cancelled', ARGV[3], ARGV[4], ARGV[5])
elseif job.status == 'running' then
  redis.call('HSET', job_key(job.id), 'cancel_requested', '1')
end
return redis.call('HGETALL', job_key(job.id))

-- name: requeue
-- ARGV: prefix, id, now, upstream-failed error prefix. Returns the record afterwards, or nil.
local job = state(ARGV[2])
if not job then return false end
local key = job_key(job.id)
if FINISHED[job.status] and not (job.unique and live_holder(job.unique)) then
  redis.call('HDEL', key, 'result', 'error', 'traceback', 'progress', 'progress_message',
             'started_at', 'finished_at', 'worker_id', 'lost_leases')
  -- A workflow step still missing inputs waits for them again.
  local status = (tonumber(redis.call('HGET', key, 'blocked_by')) or 0) > 0 and 'blocked'
                 or 'queued'
  redis.call('HSET', key, 'status', status, 'attempts', 0, 'eta', ARGV[3],
             'cancel_requested', '0')
  redis.call('PERSIST', key)
  redis.call('PERSIST', inputs_key(job.id))
  redis.call('ZREM', P .. 'finished', job.id)
  index(job, status)
  if status == 'queued' then add_waiting(job, ARGV[3]) end
  if job.unique then redis.call('SET', unique_key(job.unique), job.id) end
  wake(job.queue)
  -- The steps downstream that this step's failure cancelled wait for it again.
  local links = flow_links(job.id)
  for _, step in ipairs(links and downstream(links, 'cancelled', ARGV[4]) or {}) do
    index(step, 'blocked')
    redis.call('HSET', job_key(step.id), 'status', 'blocked')
    redis.call('HDEL', job_key(step.id), 'finished_at', 'error')
    redis.call('ZREM', P .. 'finished', step.id)
    redis.call('PERSIST', job_key(step.id))
    redis.call('PERSIST', inputs_key(step.id))
  end
end
return redis.call('HGETALL', key)

-- name: list_jobs
-- ARGV: prefix, status ('' for any), queue ('' for any), limit, offset. Newest first.
local limit, offset = tonumber(ARGV[4]), tonumber(ARGV[5])
if limit <= 0 then return {} end
local queues = ARGV[3] ~= '' and {ARGV[3]} or redis.call('SMEMBERS', P .. 'queues')
local statuses = ARGV[2] ~= '' and {ARGV[2]} or STATUSES
local found = {}
for _, queue in ipairs(queues) do
  for _, status in ipairs(statuses) do
    local got = redis.call('ZREVRANGE', idx_key(queue, status), 0, offset + limit - 1,
                           'WITHSCORES')
    for k = 1, #got, 2 do found[#found + 1] = {tonumber(got[k + 1]), got[k]} end
  end
end
table.sort(found, function(a, b) return a[1] > b[1] end)
local out = {}
for k = offset + 1, math.min(offset + limit, #found) do
  local record = redis.call('HGETALL', job_key(found[k][2]))
  if #record > 0 then out[#out + 1] = record end
end
return out

-- name: job_page
-- ARGV: prefix, status, queue, task ('' for any), limit, before ('' for the newest), budget.
-- Newest first by seq, merged from the index zsets the filters pick; a task is matched on
-- the records, looking at no more than budget candidates per call. Returns the records and
-- the seq to continue before ('' when nothing is left).
local task, limit, budget = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[7])
local top = ARGV[6] ~= '' and '(' .. ARGV[6] or '+inf'
local queues = ARGV[3] ~= '' and {ARGV[3]} or redis.call('SMEMBERS', P .. 'queues')
local statuses = ARGV[2] ~= '' and {ARGV[2]} or STATUSES
local want = task ~= '' and math.max(budget, limit + 1) or limit + 1
local found = {}
for _, queue in ipairs(queues) do
  for _, status in ipairs(statuses) do
    local got = redis.call('ZREVRANGEBYSCORE', idx_key(queue, status), top, '-inf',
                           'WITHSCORES', 'LIMIT', 0, want)
    for k = 1, #got, 2 do found[#found + 1] = {tonumber(got[k + 1]), got[k]} end
  end
end
table.sort(found, function(a, b) return a[1] > b[1] end)
local out, last = {}, ''
for k = 1, math.min(want, #found) do
  local seq, id = found[k][1], found[k][2]
  if #out == limit then return {out, last} end
  if task == '' or redis.call('HGET', job_key(id), 'task') == task then
    local record = redis.call('HGETALL', job_key(id))
    if #record > 0 then out[#out + 1] = record end
  end
  last = string.format('%d', seq)
end
if #found < want then last = '' end
return {out, last}

-- name: pause_queue
-- ARGV: prefix, queue.
redis.call('SADD', P .. 'paused', ARGV[2])
return 0

-- name: resume_queue
-- ARGV: prefix, queue.
if redis.call('SREM', P .. 'paused', ARGV[2]) == 1 then wake(ARGV[2]) end
return 0

-- name: set_schedule_paused
-- ARGV: prefix, schedule, paused ('1' or '0'), now.
local key = P .. 'schedstate:' .. ARGV[2]
if redis.call('HGET', key, 'paused') == '1' and ARGV[3] == '0' then
  redis.call('HSET', key, 'since', ARGV[4])
end
redis.call('HSET', key, 'paused', ARGV[3])
redis.call('SADD', P .. 'schedstates', ARGV[2])
return 0

-- name: set_schedule_timing
-- ARGV: prefix, schedule, every, cron ('' for none), now.
local key = P .. 'schedstate:' .. ARGV[2]
redis.call('HDEL', key, 'every', 'cron')
if ARGV[3] ~= '' then redis.call('HSET', key, 'every', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', key, 'cron', ARGV[4]) end
redis.call('HSET', key, 'since', ARGV[5])
redis.call('SADD', P .. 'schedstates', ARGV[2])
return 0

-- name: schedule_states
-- ARGV: prefix. Returns name, fields pairs.
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', P .. 'schedstates')) do
  out[#out + 1] = name
  out[#out + 1] = redis.call('HGETALL', P .. 'schedstate:' .. name)
end
return out

-- name: finished_counts
-- ARGV: prefix, since minute. Returns minute, field, count triples.
local out = {}
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finishedminutes', ARGV[2], '+inf')) do
  local counts = redis.call('HGETALL', P .. 'finished:' .. minute)
  for k = 1, #counts, 2 do
    out[#out + 1] = minute
    out[#out + 1] = counts[k]
    out[#out + 1] = counts[k + 1]
  end
end
return out

-- name: sample_depth
-- ARGV: prefix, minute, ttl, the first minute whose count is kept apart (older ones are
-- folded into minute 0). Returns 1 if this call stored the minute's sample.
local key = P .. 'depth:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return 0 end
local sample = {}
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  for _, status in ipairs({'queued', 'scheduled', 'running'}) do
    local n = redis.call('ZCARD', idx_key(queue, status))
    if n > 0 then sample[#sample + 1] = {queue, status, n} end
  end
end
redis.call('SET', key, #sample > 0 and cjson.encode(sample) or '[]', 'EX', ARGV[3])
redis.call('ZADD', P .. 'depthminutes', ARGV[2], ARGV[2])
fold_finished('(' .. ARGV[4])  -- once a minute, by whoever sampled, as the SQL stores do
return 1

-- name: enqueued_counts
-- ARGV: prefix. Returns field, count pairs.
return redis.call('HGETALL', P .. 'enqueued')

-- name: timings
-- ARGV: prefix. Returns field, value pairs.
return redis.call('HGETALL', P .. 'timings')

-- name: depth_samples
-- ARGV: prefix, since minute. Returns minute, JSON pairs.
local out = {}
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'depthminutes', ARGV[2], '+inf')) do
  local sample = redis.call('GET', P .. 'depth:' .. minute)
  if sample then
    out[#out + 1] = minute
    out[#out + 1] = sample
  end
end
return out

-- name: counts
-- ARGV: prefix. Returns queue, status, count triples for every non-empty pair.
local out = {}
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  for _, status in ipairs(STATUSES) do
    local n = redis.call('ZCARD', idx_key(queue, status))
    if n > 0 then
      out[#out + 1] = queue
      out[#out + 1] = status
      out[#out + 1] = n
    end
  end
end
return out

-- name: next_eta
-- ARGV: prefix, queues (none: all). Returns the earliest eta as text, or nil.
local best, text = nil, false
for _, queue in ipairs(serving_from(2)) do
  for _, p in ipairs(redis.call('SMEMBERS', prios_key(queue))) do
    local head = redis.call('ZRANGE', wait_key(queue, p), 0, 0, 'WITHSCORES')
    if #head > 0 and (best == nil or tonumber(head[2]) < best) then
      best, text = tonumber(head[2]), head[2]
    end
  end
end
return text

-- name: fire_tick
-- ARGV: prefix, nonce, schedule, fire time text, now, jobs (one). Returns 1 for the first.
local nonce, schedule, fire_time, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('ZSCORE', P .. 'ticks:' .. schedule, fire_time) then return 0 end
local job = parse_jobs(ARGV[6])[1]
if redis.call('EXISTS', job_key(job.id)) == 1 then
  return redis.error_reply('ERRANDS job id already stored: ' .. job.id)
end
number({job})
local holder = insert(job, nonce)
write_pending()
local id = holder == 0 and job.id or false
if not id then
  for k = 1, #holder, 2 do if holder[k] == 'id' then id = holder[k + 1] end end
end
redis.call('SADD', P .. 'schedules', schedule)
redis.call('ZADD', P .. 'ticks:' .. schedule, fire_time, fire_time)
redis.call('ZADD', P .. 'tickfired:' .. schedule, now, fire_time)
redis.call('HSET', P .. 'tickjob:' .. schedule, fire_time, id or '')
wake(job.queue)
return 1

-- name: last_ticks
-- ARGV: prefix. Returns schedule, fire time text, job id triples.
local out = {}
for _, schedule in ipairs(redis.call('SMEMBERS', P .. 'schedules')) do
  local latest = redis.call('ZRANGE', P .. 'ticks:' .. schedule, -1, -1)[1]
  if latest then
    out[#out + 1] = schedule
    out[#out + 1] = latest
    out[#out + 1] = redis.call('HGET', P .. 'tickjob:' .. schedule, latest) or ''
  end
end
return out

-- name: prune
-- ARGV: prefix, finished before, batch size. Returns jobs deleted, and 1 if more are left.
local before, batch = '(' .. ARGV[2], tonumber(ARGV[3])
local deleted, more = 0, 0
local queues = redis.call('SMEMBERS', P .. 'queues')
local ids = redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', before, 'LIMIT', 0, batch)
if #ids == batch then more = 1 end
for _, id in ipairs(ids) do
  local job = state(id)
  if job and FINISHED[job.status] then
    delete_job(job)
  elseif not job then
    -- The record expired by its TTL before prune came by: clear it from the indexes.
    for _, queue in ipairs(queues) do
      for status in pairs(FINISHED) do redis.call('ZREM', idx_key(queue, status), id) end
    end
  end
  if not job or FINISHED[job.status] then deleted = deleted + 1 end
  redis.call('ZREM', P .. 'finished', id)
end
for _, schedule in ipairs(redis.call('SMEMBERS', P .. 'schedules')) do
  local ticks, fired = P .. 'ticks:' .. schedule, P .. 'tickfired:' .. schedule
  local latest = redis.call('ZRANGE', ticks, -1, -1)[1]
  local old = redis.call('ZRANGEBYSCORE', fired, '-inf', before, 'LIMIT', 0, batch)
  if #old == batch then more = 1 end
  for _, fire_time in ipairs(old) do
    if fire_time ~= latest then
      redis.call('ZREM', ticks, fire_time)
      redis.call('ZREM', fired, fire_time)
      redis.call('HDEL', P .. 'tickjob:' .. schedule, fire_time)
    end
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'workers', '-inf', ARGV[2])) do
  redis.call('ZREM', P .. 'workers', id)
  redis.call('HDEL', P .. 'workerinfo', id)
end
local cut = '(' .. string.format('%d', math.floor(tonumber(ARGV[2]) / 60))
-- Minute 0 keeps the counts of every minute pruned: totals since the start stay known.
fold_finished(cut)
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'depthminutes', '(0', cut)) do
  redis.call('DEL', P .. 'depth:' .. minute)
  redis.call('ZREM', P .. 'depthminutes', minute)
end
for _, queue in ipairs(queues) do
  for _, p in ipairs(redis.call('SMEMBERS', prios_key(queue))) do
    if redis.call('EXISTS', wait_key(queue, p)) == 0 then redis.call('SREM', prios_key(queue), p) end
  end
  local keys = {prios_key(queue), lease_key(queue)}
  for _, status in ipairs(STATUSES) do keys[#keys + 1] = idx_key(queue, status) end
  if redis.call('EXISTS', unpack(keys)) == 0 then redis.call('SREM', P .. 'queues', queue) end
end
return {deleted, more}

-- name: purge
-- ARGV: prefix, queue, status, before ('' for any), after seq, batch size.
-- Deletes matching jobs of one index, in seq order from a cursor; returns count, next cursor.
local before = ARGV[4] ~= '' and tonumber(ARGV[4]) or nil
local batch = tonumber(ARGV[6])
local got = redis.call('ZRANGEBYSCORE', idx_key(ARGV[2], ARGV[3]), '(' .. ARGV[5], '+inf',
                       'WITHSCORES', 'LIMIT', 0, batch)
local deleted = 0
for k = 1, #got, 2 do
  local job = state(got[k])
  if not job then
    redis.call('ZREM', idx_key(ARGV[2], ARGV[3]), got[k])
  elseif job.status ~= 'running' then
    local at = redis.call('HMGET', job_key(job.id), 'finished_at', 'enqueued_at')
    if before == nil or (tonumber(at[1] or at[2]) or 0) < before then
      delete_job(job)
      deleted = deleted + 1
    end
  end
end
return {deleted, #got == 2 * batch and got[#got] or ''}

-- name: delete
-- ARGV: prefix, id. Deletes a finished job: 1, or 0 when it is unknown or not finished.
local job = state(ARGV[2])
if not job or not (job.status == 'succeeded' or job.status == 'failed'
                   or job.status == 'cancelled') then
  return 0
end
delete_job(job)
return 1

-- name: register_worker
-- ARGV: prefix, worker id, expiry, info JSON.
redis.call('ZADD', P .. 'workers', ARGV[3], ARGV[2])
redis.call('HSET', P .. 'workerinfo', ARGV[2], ARGV[4])
return 0

-- name: unregister_worker
-- ARGV: prefix, worker id.
redis.call('ZREM', P .. 'workers', ARGV[2])
redis.call('HDEL', P .. 'workerinfo', ARGV[2])
return 0

-- name: list_workers
-- ARGV: prefix, now. Returns id, info JSON pairs of workers whose registration holds.
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'workers', '(' .. ARGV[2], '+inf')) do
  local info = redis.call('HGET', P .. 'workerinfo', id)
  if info then
    out[#out + 1] = id
    out[#out + 1] = info
  end
end
return out
