// Package redlatch provides distributed synchronization on Redis:
// Redisson-grade locks for Go services.
//
// A Client, made once per Redis deployment with New, hands out the
// primitives:
//
//   - Mutex: a mutual exclusion lock, not reentrant. A handle shared by
//     goroutines behaves like sync.Mutex.
//   - ReentrantMutex: a lock its owner may take several times; each Lock
//     needs one Unlock.
//   - FairMutex: a reentrant lock granted strictly in arrival order at
//     Redis, handed directly to the queue head by Unlock.
//   - RWMutex: many readers or one writer, both reentrant; a writer may
//     downgrade, a waiting writer holds new readers off, and every read
//     hold has its own lease.
//   - Semaphore: at most size permits held at once; every acquisition is a
//     leased permit record, so a crashed holder's permits come back.
//   - CountDownLatch: waiters are released together when the count set by
//     TrySetCount is counted down to zero.
//   - Redlock: a lock over N independent masters, held while a quorum
//     (N/2+1) grants it.
//
// It needs Redis 6.2 or later, single node, Sentinel or Cluster (not a
// go-redis Ring: use a Client per server with Redlock).
//
// Every hold has a lease, so a crashed holder cannot lock others out for
// longer than its lease. Holds taken without WithLease are renewed by the
// Client's watchdog: one goroutine per Client renews all of them in batched
// script calls every WithWatchdogTimeout/3 (10s by default), for as long as
// the holder lives and has not unlocked. When a hold ends before its Unlock
// (the lock was force-unlocked, expired, or Redis could not be reached before
// the lease ran out on the local clock) the channel returned by Lost closes;
// Do runs a function under a lock with a context cancelled at that moment.
//
// A release (Unlock, RUnlock, Release, and a latch's CountDown and Delete)
// given a context that has ended already is still sent, with a fresh
// context bounded by 2s: a deferred Unlock(ctx) after a request's ctx was
// cancelled, or whose deadline passed during the work, releases the lock
// instead of leaving it taken for its whole lease. An Unlock or RUnlock
// whose context ends while it is on its way returns the context's error,
// and is sent again in the background with a fresh context bounded by 2s
// (Redis applies it once): the handle has let go of the hold either way.
// A Release, CountDown or Delete whose context ends on its way is sent
// again before it returns, with the same fresh context, and reports what
// it did.
//
// Waiters do not poll. A blocked Lock subscribes to the lock's channel (one
// subscriber connection per Client, shared by all waiters; one per master on
// a Redis ≥ 7 Cluster, which shards pub/sub) and sleeps until
// the holder's Unlock publishes a wake-up, or the holder's lease runs out,
// whichever comes first: a lost message or a crashed holder delays a waiter
// by at most the holder's remaining lease, and a dropped subscriber
// connection wakes every waiter to retry as soon as it is re-established.
//
// # Guarantees
//
//   - Acquisition and release are single Lua scripts: there is no window
//     between setting a lock and giving it a lease.
//   - Only the owner can release its hold (compare-and-delete on the owner
//     id); ForceUnlock is the explicit exception.
//   - Deadlines come from Redis (lease expiry) and, for the holder's own view
//     of its lease, from the local monotonic clock; no two clocks are
//     compared.
//   - Fencing tokens (Token) strictly increase per lock name at every change
//     of owner, and survive the loss of their counter (FLUSHALL, a restart
//     without persistence) because they are derived from the Redis server's
//     clock. A resource that rejects tokens lower than the highest it has
//     seen is safe against a holder paused past its lease.
//   - Requests retried after a lost reply are recognised by a request id:
//     an acquisition or release is applied once. A reentrant hold tells
//     apart the last 8 acquisitions and 8 partial releases of its owner
//     whose outcome a caller may not know (README, "Design notes").
//
// Handles sharing an owner id (WithOwner) share one hold, whose lease no
// renewal or re-entry shortens: it lasts the longest lease any of them gave
// it, even after that handle released (a crashed short-lease holder then
// blocks others until that longer lease runs out).
//
// # Limits
//
// A single Redis (or one Cluster shard) is a single point of truth: when a
// master fails over before replicating a lock, a second client may take the
// lock. WithReplicaSync narrows this window (an acquisition too few replicas
// acknowledged is refused), Redlock removes the single master, and fencing
// tokens let the protected resource detect what remains; locks alone
// cannot. A lease protects only as long as the holder notices its loss:
// a process paused longer than its lease (GC, SIGSTOP) resumes believing it
// holds the lock until its next look at Lost, which is what fencing tokens
// are for.
package redlatch
