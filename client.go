package redlatch

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// Defaults of the options.
const (
	// DefaultWatchdogTimeout is the lease of a watchdog-renewed hold. The
	// watchdog renews it every DefaultWatchdogTimeout/3.
	DefaultWatchdogTimeout = 30 * time.Second

	// cleanupTimeout bounds the fresh context used to undo a half-finished
	// acquisition after the caller's context ended.
	cleanupTimeout = 2 * time.Second
	// checkReserve is what the cluster version check leaves of a call's
	// ctx, at most, for the call's own command (see probePublish).
	checkReserve = 200 * time.Millisecond

	// minFenceRetention is how long the fencing counter of a lock outlives
	// its last use. See Mutex.Token for what it guarantees.
	minFenceRetention = 10 * time.Minute
)

// Option configures a Client.
type Option func(*options)

type options struct {
	prefix          string
	watchdogTimeout time.Duration
	logger          *slog.Logger
	replicas        int
	replicaTimeout  time.Duration
	err             error
}

// WithKeyPrefix sets a prefix prepended to every key and channel the Client
// uses. Default: "" (no prefix).
//
// The hash tag of each primitive follows it: the keys of a lock named
// "orders" under the prefix "app:" all start with "app:{orders}", so they
// match "app:*" (for ACLs, SCAN) and share one cluster slot. A prefix with
// '{' or '}' would change the hash tag: it makes every method return an
// error wrapping ErrInvalidArgument.
func WithKeyPrefix(prefix string) Option {
	return func(o *options) {
		if strings.ContainsAny(prefix, "{}") {
			o.err = invalidArg("key prefix", "must not contain '{' or '}'")
			return
		}
		o.prefix = prefix
	}
}

// WithWatchdogTimeout sets the lease of holds taken without WithLease.
// The Client's watchdog renews such holds every d/3 while they are held (a
// renewal that fails, e.g. refused by a busy Redis, is sent again d/12
// later), so a crashed holder's lock frees at most d after its last
// renewal. Default: 30s
// (DefaultWatchdogTimeout). A d under 3ms makes every method return an error
// wrapping ErrInvalidArgument; a fraction of a millisecond is dropped.
func WithWatchdogTimeout(d time.Duration) Option {
	return func(o *options) {
		if d < 3*time.Millisecond {
			o.err = invalidArg("watchdog timeout", "must be at least 3ms")
			return
		}
		// Redis counts leases in whole milliseconds (the scripts send
		// lease.Milliseconds()): a fraction kept here would put each
		// holder's local deadline that much past the lease Redis has.
		o.watchdogTimeout = d.Truncate(time.Millisecond)
	}
}

// WithLogger sets the logger that reports lost holds and trouble with
// renewal or the subscriber connection. Default: discard everything. Its
// handler must not block: a lost hold is logged by the watchdog with its
// lock held, and a handler that waits (on a full channel, a slow sink)
// delays the loss reports and renewals of every hold of the Client.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithReplicaSync makes every acquisition and renewal wait, with Redis's
// WAIT command, until at least replicas replicas have acknowledged it, or
// timeout passes. Default: off (replicas = 0).
//
// It covers every lock (Mutex, ReentrantMutex, FairMutex, RWMutex, Redlock's
// nodes) and every Semaphore permit. The script and its WAIT are pipelined
// in one round trip. An acquisition too few replicas acknowledged is
// released again and fails with an error wrapping ErrNotReplicated (a
// blocking Lock returns it at once); a renewal too few replicas
// acknowledged does not move the hold's local deadline, so Lost closes if
// replication does not recover within the lease. With no replica at all,
// every acquisition fails.
func WithReplicaSync(replicas int, timeout time.Duration) Option {
	return func(o *options) {
		if replicas < 0 {
			o.err = invalidArg("replicas", "must not be negative")
			return
		}
		if replicas > 0 && timeout <= 0 {
			o.err = invalidArg("replica sync timeout", "must be positive")
			return
		}
		if replicas == 0 {
			timeout = 0 // off: no WAIT, nothing to wait for
		}
		o.replicas, o.replicaTimeout = replicas, timeout
	}
}

// Client makes the synchronization primitives of one Redis deployment and
// owns what they share: one watchdog goroutine that renews every held lease,
// and one subscriber connection per Redis node that wakes every waiter.
// A Client is safe for concurrent use. Close it when done.
type Client struct {
	rdb     redis.UniversalClient
	opts    options
	cluster *redis.ClusterClient // set when rdb is a cluster client
	// hookNodes is set when cluster has ContextTimeoutEnabled off: the
	// node clients redlatch calls directly get their deadlineHook (see
	// Client.node).
	hookNodes bool
	err       error // a bad argument of New, returned by every method

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	closed atomic.Bool

	wd *watchdog
	ps *pubsub

	pubMu  sync.Mutex
	pubCmd string // "PUBLISH", or "SPUBLISH" on a Redis ≥ 7 cluster; "" until probed
	// probing is held (capacity 1) by the one call checking the masters'
	// versions; the others wait for it (see probePublish).
	probing chan struct{}
	// sharded is set once pubCmd is "SPUBLISH": channels subscribed with
	// plain pub/sub before then (a failed probe) are moved to sharded
	// pub/sub, where every Client publishes now.
	sharded atomic.Bool

	// waits counts the acquisitions under way (every Lock, TryLock,
	// RLock, Acquire and Wait; the whole call of a ReentrantMutex, a
	// FairMutex and an RWMutex, its queue place and supersede included;
	// a Redlock's Lock on each of its Clients) and the releases resent in
	// the background (see resendRelease): when Close ends the acquisitions
	// they withdraw their queue places and give back what they took or
	// were handed, which Close waits for, as for the resends (up to
	// cleanupTimeout), so that the Redis client may be closed once it
	// returns. idle, set by Close while waits is not 0, is closed when it
	// drops to 0. Both guarded by waitMu.
	waitMu sync.Mutex
	waits  int
	idle   chan struct{}
}

// enterWait registers a call whose cleanup Close waits for (see waits). It
// returns false, registering nothing, once Close has begun.
func (c *Client) enterWait() bool {
	c.waitMu.Lock()
	defer c.waitMu.Unlock()
	if c.closed.Load() {
		return false
	}
	c.waits++
	return true
}

// enterResend registers a release resent in the background (see
// resendRelease), or a Redlock's undo that outlives its call (see
// Redlock.release). Unlike enterWait, it also registers once Close has
// begun while calls are still registered: the cleanup of a wait that Close
// ended (an undo, a give-back, a withdrawal) may fail with no reply, and
// its resend is what frees the hold; Close waits for it as for that wait
// (up to cleanupTimeout). It returns false once no registered call is left
// (Close's wait is over, or about to be): the release is resent
// unregistered then.
func (c *Client) enterResend() bool {
	c.waitMu.Lock()
	defer c.waitMu.Unlock()
	if c.closed.Load() && c.waits == 0 {
		return false
	}
	c.waits++
	return true
}

// leaveWait ends a call registered by enterWait.
func (c *Client) leaveWait() {
	c.waitMu.Lock()
	defer c.waitMu.Unlock()
	if c.waits--; c.waits == 0 && c.idle != nil {
		close(c.idle)
		c.idle = nil
	}
}

// New returns a Client on rdb, which may be a *redis.Client, a
// *redis.ClusterClient or a sentinel failover client. New does not talk to
// Redis. A *redis.Ring is refused (ErrInvalidArgument): it shards keys
// over independent servers, which the watchdog's batches and the pub/sub
// connection do not follow; use a Client per server with NewRedlock
// instead. A nil rdb or a bad option does not panic: every method of the
// returned Client and of the primitives it makes then returns an error
// wrapping ErrInvalidArgument (except Close: the first has nothing to stop
// and returns nil, a second returns ErrClosed).
//
// A call waits for Redis no longer than its ctx's deadline, also when
// rdb's ContextTimeoutEnabled is off (go-redis's default, under which
// go-redis waits for a reply until its ReadTimeout whatever ctx says): on a
// *redis.Client (a sentinel failover client too) New adds a hook to rdb
// that sends redlatch's script calls and reads through a clone of rdb with
// the option on, sharing rdb's connection pool (but for the calls on a
// pinned connection, under WithReplicaSync: see the README's Known gaps).
// The hooks added to rdb before New see those calls as usual; add yours
// before New: go-redis runs the hooks added later closer to the server,
// and the calls go round them. On a *redis.ClusterClient the same is done
// at each master's node client (with the cluster client's redirects
// followed): the hooks on the cluster client see every call, and so do
// those given to its node clients (OnNewNode) before New. A ctx cancelled
// before its deadline ends no read: go-redis sets only deadlines on the
// socket.
func New(rdb redis.UniversalClient, opts ...Option) *Client {
	c := &Client{rdb: rdb, probing: make(chan struct{}, 1)}
	c.opts = options{
		watchdogTimeout: DefaultWatchdogTimeout,
		logger:          slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for _, opt := range opts {
		if opt != nil {
			opt(&c.opts)
		}
	}
	c.err = c.opts.err
	if isNil(rdb) {
		c.err = invalidArg("redis client", "is nil")
	} else if _, ring := rdb.(*redis.Ring); ring {
		// A Ring shards keys by hash over independent servers: the
		// watchdog's batches and the pub/sub connection assume one server
		// or a Cluster, and would report holds on other shards as lost.
		// Use one Client per server with NewRedlock instead.
		c.err = invalidArg("redis client", "is a *redis.Ring: use a *redis.Client, a *redis.ClusterClient or a failover client")
	}
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		c.cluster = cc
	}
	if c.err == nil {
		c.hookNodes = honourDeadlines(rdb)
		if c.cluster != nil {
			hookTryAgain(c.cluster)
		}
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wd = newWatchdog(c)
	c.ps = newPubsub(c)
	if r, ok := rdb.(*redis.Client); ok && c.err == nil && r.Options().Addr == "FailoverClient" {
		// A sentinel failover client (go-redis names its address so).
		watchFailover(r, c.ps)
	}
	if c.err == nil {
		c.wd.start()
	}
	return c
}

// isNil reports whether the interface holds nil or a typed nil pointer.
func isNil(rdb redis.UniversalClient) bool {
	switch v := rdb.(type) {
	case nil:
		return true
	case *redis.Client:
		return v == nil
	case *redis.ClusterClient:
		return v == nil
	case *redis.Ring:
		return v == nil
	}
	return false
}

// Close stops the watchdog and the subscriber connections, and waits for
// their goroutines to exit (on their own may run on: a check of a cluster's
// versions that Close cut short, for up to 2s, or until the ReadTimeout
// when its reload of the slot map asks a node that does not answer (see
// probePublish), and a renewal or a
// reconnection of a subscriber connection in flight to a server that does
// not answer, until its read deadline).
//
// Waits in progress return ErrClosed, also one whose attempt was on its way
// at Close and took the lock: what it took is given back (a Redlock's too,
// when the Clients of so many of the masters that granted it were closed
// that no quorum is left). An attempt on its way to a server that does not
// answer ends its wait only at its read deadline (its ctx's, or the Redis
// client's ReadTimeout). Close waits (up to 2s) for the waits it ended to
// leave their queues and give back what they took, for the releases
// resent in the background (see the package doc), and for a Redlock's
// releases and undos still on their way to a slow master after its call
// returned, so that the Redis client may be closed next. A release called
// after Close (an Unlock of a hold taken before it, or a Redlock's Unlock
// on a closed Client) whose send fails with no reply or is refused as busy
// is resent in the background unwaited-for, within the same 2s: closing
// the Redis client at once cuts that resend short, and the hold then
// expires with its lease.
//
// Locks and permits held before Close are no longer renewed: they expire
// after their lease. Close does not close the Redis client given to New. A
// second Close returns ErrClosed.
func (c *Client) Close() error {
	if c == nil {
		return invalidArg("client", "is nil")
	}
	if c.cancel == nil {
		return invalidArg("client", "is not made by New")
	}
	if !c.closed.CompareAndSwap(false, true) {
		return ErrClosed
	}
	c.cancel()
	c.wd.stop()
	c.ps.close()
	// The waits just ended leave their queues (a bounded cleanup each)
	// before the caller may close the Redis client.
	c.waitMu.Lock()
	var idle chan struct{}
	if c.waits > 0 {
		idle = make(chan struct{})
		c.idle = idle
	}
	c.waitMu.Unlock()
	if idle != nil {
		t := time.NewTimer(cleanupTimeout)
		defer t.Stop()
		select {
		case <-idle:
		case <-t.C: // an attempt on its way to an unresponsive Redis
		}
	}
	return nil
}

// check returns the error every method returns before touching Redis: a bad
// argument of New, or ErrClosed.
func (c *Client) check() error {
	if c == nil {
		return invalidArg("client", "is nil")
	}
	if c.rdb == nil && c.err == nil {
		return invalidArg("client", "is not made by New")
	}
	if c.err != nil {
		return c.err
	}
	if c.closed.Load() {
		return ErrClosed
	}
	return nil
}

// tag returns the start shared by every key and channel of the primitive
// called name: prefix + "{" + name + "}". Its hash tag is the name, or the
// part of it before its first '}' (the prefix has no braces; a name starting
// with '}' is refused), so all keys of one primitive hash to one cluster
// slot. The suffixes after it hold no '}', so two (prefix, name) pairs never
// share a key or a channel.
func (c *Client) tag(name string) string {
	return c.opts.prefix + "{" + name + "}"
}

// publishCommand returns the command scripts use to publish wake-ups:
// SPUBLISH on a Redis Cluster of version 7 or later (sharded pub/sub, the
// channel lives in the lock's slot), PUBLISH everywhere else.
func (c *Client) publishCommand(ctx context.Context) string {
	if c.cluster == nil {
		return "PUBLISH"
	}
	cmd := c.probePublish(ctx)
	if cmd == "SPUBLISH" && !c.sharded.Load() && c.sharded.CompareAndSwap(false, true) {
		// Channels a waiter subscribed while no probe had succeeded are on
		// plain pub/sub, which hears no SPUBLISH: move them.
		detached(ctx, c.ps.reshard)
	}
	return cmd
}

// waitPublishCommand is publishCommand for a wait that has taken nothing
// yet: Close ends its check of the masters' versions too (Close waits for
// the wait, see Client.waits), and closed reports that it did.
//
// go-redis does not end a read when its ctx is cancelled (only at the
// ctx's deadline), so a cancelled check may still wait on a master that
// does not answer: the check runs in its own goroutine, which ends at the
// check's bound (at most cleanupTimeout), and the wait leaves it at Close.
func (c *Client) waitPublishCommand(ctx context.Context) (cmd string, closed bool) {
	c.pubMu.Lock()
	known := c.pubCmd != ""
	c.pubMu.Unlock()
	if c.cluster == nil || known {
		return c.publishCommand(ctx), c.ctx.Err() != nil
	}
	pctx, stop := context.WithCancel(ctx)
	done := make(chan string, 1)
	go func() {
		defer stop()
		done <- c.publishCommand(pctx)
	}()
	select {
	case cmd = <-done:
		return cmd, c.ctx.Err() != nil
	case <-c.ctx.Done():
		stop()
		return "PUBLISH", true
	}
}

// probePublish is publishCommand's check of the masters' versions, on a
// cluster.
func (c *Client) probePublish(ctx context.Context) string {
	c.pubMu.Lock()
	cmd := c.pubCmd
	c.pubMu.Unlock()
	if cmd != "" {
		return cmd
	}
	// Sharded pub/sub needs every master at version 7 or later. A failed
	// probe is not remembered: it is tried again on the next call, so that
	// one transient error cannot leave this Client publishing where the
	// others do not listen. The check (and the wait for another call's
	// check) ends with the caller's ctx, keeping part of what is left of
	// it for the call's own command: half for a cleanup (under
	// cleanupContext's cleanupTimeout); for any other call no more than
	// checkReserve, so that a check that would succeed is seldom cut short
	// (it would publish on plain pub/sub, where the other Clients do not
	// listen: a lost wake-up), yet one that cannot succeed (a master that
	// does not answer) leaves the call time to run (an Unlock that
	// releases, publishing on plain pub/sub; see the README).
	bound := cleanupTimeout
	if d, ok := ctx.Deadline(); ok {
		left := time.Until(d)
		reserve := left / 2
		if ctx.Value(cleanupKey{}) == nil {
			reserve = min(reserve, checkReserve)
		}
		bound = min(bound, left-reserve)
	}
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	// One call checks at a time; the others wait for it, within the bound
	// above.
	select {
	case c.probing <- struct{}{}:
	case <-ctx.Done():
		return "PUBLISH"
	}
	c.pubMu.Lock()
	cmd = c.pubCmd
	c.pubMu.Unlock()
	if cmd != "" {
		<-c.probing
		return cmd
	}
	// The check runs in its own goroutine, which holds probing until it
	// ends, and the call leaves it when ctx ends: ForEachMaster starts by
	// reloading the slot map from a node picked at random, and a node
	// client the cluster client made before New has no deadlineHook (the
	// cluster client's OnNewNode reaches only those made after), so its
	// CLUSTER SLOTS to a node that does not answer waits for the
	// ReadTimeout whatever ctx says.
	done := make(chan string, 1)
	go func() {
		defer func() { <-c.probing }()
		done <- c.checkVersions(ctx)
	}()
	select {
	case cmd = <-done:
		return cmd
	case <-ctx.Done():
		return "PUBLISH"
	}
}

// checkVersions is probePublish's check of the masters' versions, which
// remembers the command it returns unless the check failed.
func (c *Client) checkVersions(ctx context.Context) string {
	var cmd string
	var mu sync.Mutex
	major := -1
	// own: on go-redis's default options, the checks, and the reload of
	// the slot map that ForEachMaster starts with, are routed as the
	// scripts are (see clusterDeadlineHook), and end with ctx.
	err := c.cluster.ForEachMaster(own(ctx), func(ctx context.Context, n *redis.Client) error {
		n = c.node(n)
		info, err := n.Info(ctx, "server").Result()
		v := redisMajor(info)
		if isReplyError(err) {
			// INFO is refused (NOPERM: it is @dangerous, which ACL users
			// are often denied). HELLO without arguments (Redis ≥ 6.2)
			// names the version too, and ACLs do not restrict it.
			var hello any
			hello, err = n.Do(ctx, "HELLO").Result()
			v = helloMajor(hello)
		}
		mu.Lock()
		defer mu.Unlock()
		if err == nil && (major < 0 || v < major) {
			major = v
		}
		return err
	})
	switch {
	case err != nil:
		return "PUBLISH"
	case major >= 7:
		cmd = "SPUBLISH"
	default:
		cmd = "PUBLISH"
	}
	c.pubMu.Lock()
	c.pubCmd = cmd
	c.pubMu.Unlock()
	return cmd
}

// redisMajor parses the major version from an INFO server reply.
func redisMajor(info string) int {
	_, rest, ok := strings.Cut(info, "redis_version:")
	if !ok {
		return 0
	}
	n := 0
	for _, r := range rest {
		if r < '0' || r > '9' {
			break
		}
		n = n*10 + int(r-'0')
	}
	return n
}

// helloMajor parses the major version from a HELLO reply: a map (RESP3)
// or a flat list of fields and values (RESP2).
func helloMajor(reply any) int {
	var version any
	switch r := reply.(type) {
	case map[any]any:
		version = r["version"]
	case map[string]any:
		version = r["version"]
	case []any:
		for i := 0; i+1 < len(r); i += 2 {
			if k, _ := r[i].(string); k == "version" {
				version = r[i+1]
			}
		}
	}
	s, _ := version.(string)
	return redisMajor("redis_version:" + s)
}

// newID returns a fresh identifier for a request (or a waiter, a permit
// record, a Client's channel): unique across processes and calls, in the
// characters [A-Za-z0-9_.-], which the scripts' separators (':' and '|')
// avoid. It is this process's random prefix (96 bits from crypto/rand,
// drawn once) followed by a counter, so a call costs no random read; two
// processes share a prefix with a chance of about n²/2⁹⁷ among n of them.
func newID() string {
	var b strings.Builder
	b.Grow(len(idPrefix) + 13) // 13: the longest uint64 in base 36
	b.WriteString(idPrefix)
	var digits [13]byte
	b.Write(strconv.AppendUint(digits[:0], idSeq.Add(1), 36))
	return b.String()
}

var (
	idPrefix = func() string {
		var b [12]byte
		_, _ = rand.Read(b[:]) // never fails (crypto/rand, Go ≥ 1.24)
		return base64.RawURLEncoding.EncodeToString(b[:]) + "."
	}()
	idSeq atomic.Uint64
)

// newOwnerID returns a fresh random owner id, the default identity of a
// handle.
func newOwnerID() string { return uuid.NewString() }

// LockOption configures a lock, semaphore or Redlock handle.
type LockOption func(*lockOptions)

type lockOptions struct {
	lease  time.Duration // 0: watchdog-renewed
	owner  string
	shared bool // the owner id came from WithOwner: other handles may share it
	err    error
}

// WithLease gives each hold a fixed lease d with no watchdog renewal: the
// hold ends d after it was taken unless released first, and Lost closes then.
// Default: a watchdog-renewed lease (see WithWatchdogTimeout). A d ≤ 0 makes
// the handle's methods return an error wrapping ErrInvalidArgument; a
// positive d under a millisecond counts as one millisecond, and a fraction
// of a millisecond is dropped.
func WithLease(d time.Duration) LockOption {
	return func(o *lockOptions) {
		if d <= 0 {
			o.err = invalidArg("lease", "must be positive")
			return
		}
		// Redis counts leases in whole milliseconds; a shorter one would
		// round to PEXPIRE 0, which deletes the key. A fraction of a
		// millisecond is dropped: the scripts send lease.Milliseconds(),
		// and the local deadline must not run past the lease Redis has.
		o.lease = max(d.Truncate(time.Millisecond), time.Millisecond)
	}
}

// WithOwner sets the owner identity of a handle. Handles with the same
// owner id, in one process or several, share ownership: a reentrant lock
// taken by one can be re-entered and released by the other. Default: a fresh
// random id per handle. An empty id makes the handle's methods return an
// error wrapping ErrInvalidArgument.
func WithOwner(id string) LockOption {
	return func(o *lockOptions) {
		if id == "" {
			o.err = invalidArg("owner", "is empty")
			return
		}
		o.owner, o.shared = id, true
	}
}

// newLockOptions applies opts and checks name. The error, if any, is kept
// by the handle and returned by each of its methods.
func newLockOptions(name string, opts []LockOption) lockOptions {
	o := lockOptions{}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	if name == "" {
		o.err = invalidArg("name", "is empty")
	}
	if o.owner == "" {
		o.owner = newOwnerID()
	}
	return o
}

// leaseFor returns the lease of a new hold and whether the watchdog renews it.
func (c *Client) leaseFor(o lockOptions) (time.Duration, bool) {
	if o.lease > 0 {
		return o.lease, false
	}
	return c.opts.watchdogTimeout, true
}

// tokenArg is a fencing token as a script argument: "" when it is unknown
// (0), so that a release script accepts any hold of the owner.
func tokenArg(token int64) string {
	if token > 0 {
		return strconv.FormatInt(token, 10)
	}
	return ""
}

// fenceRetention returns how long a fencing counter is kept after its last
// use: at least minFenceRetention, and never less than a lease.
func fenceRetention(lease time.Duration) int64 {
	r := minFenceRetention
	if lease > r/2 {
		r = max(2*lease, lease) // 2*lease overflows for a lease of ~146 years
	}
	return r.Milliseconds()
}

// onMaster sends the commands that the function read queues to the master
// of their keys, in a MULTI, which a Redis client routing read-only commands
// to replicas (a ClusterClient with ReadOnly, RouteByLatency or
// RouteRandomly; a failover client with ReplicaOnly) still sends there: a
// lagging replica would answer with a state older than the Client's own
// last change, such as a lock just taken reported free. Its error is the
// first failed command's (redis.Nil included).
func (c *Client) onMaster(ctx context.Context, read func(p redis.Pipeliner)) error {
	// own: on go-redis's default options, routed as the scripts are (see
	// deadlineHook), so that a read, and a Wait reading a latch's count,
	// returns by its ctx.
	_, err := c.rdb.TxPipelined(own(ctx), func(p redis.Pipeliner) error {
		read(p)
		return nil
	})
	return err
}

// keyTTL returns the remaining lease of a primitive's key, read on its
// master: 0 when the key does not exist, -1 when it has no expiry (not
// written by redlatch).
func (c *Client) keyTTL(ctx context.Context, key string) (time.Duration, error) {
	var cmd *redis.DurationCmd
	if err := c.onMaster(ctx, func(p redis.Pipeliner) { cmd = p.PTTL(ctx, key) }); err != nil {
		return 0, convertErr(err)
	}
	d := cmd.Val()
	switch {
	case d == -2*time.Nanosecond || d == -2*time.Millisecond:
		return 0, nil
	case d < 0:
		return -1, nil
	}
	return d, nil
}

// keyExists reports whether key exists, read on its master.
func (c *Client) keyExists(ctx context.Context, key string) (bool, error) {
	var cmd *redis.IntCmd
	err := c.onMaster(ctx, func(p redis.Pipeliner) { cmd = p.Exists(ctx, key) })
	return err == nil && cmd.Val() > 0, convertErr(err)
}

// holdCount returns the hold count that the hash key records for owner
// (fields o and c, see lua/lock.lua), read on its master.
func (c *Client) holdCount(ctx context.Context, key, owner string) (int, error) {
	var cmd *redis.SliceCmd
	if err := c.onMaster(ctx, func(p redis.Pipeliner) { cmd = p.HMGet(ctx, key, "o", "c") }); err != nil {
		return 0, convertErr(err)
	}
	v := cmd.Val()
	if o, _ := v[0].(string); o != owner {
		return 0, nil
	}
	s, _ := v[1].(string)
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%w: hold count %q", ErrWrongType, s)
	}
	return n, nil
}

// late reports whether an acquisition that returned token took a hold older
// than tracked's, the live hold a handle tracks with token current: tokens
// only grow, so that hold ended before tracked was taken, and the reply came
// after the one that began tracked.
func late(tracked *hold, current, token int64) bool {
	return tracked != nil && !tracked.isLost() && token < current
}

// retake runs acquire once more after an acquisition whose reply named first,
// another hold than the live one its handle tracks (see late): it came back
// late, after a newer hold of the handle's owner was taken and tracked, or
// it is a new hold while the tracked one ended unnoticed (a token can be
// older after a failover to a server whose clock is behind; read holds have
// no order at all). The second attempt re-enters whichever hold is live now
// and names it. When that is first, the hold was live and has been counted
// twice, so one count is given back; when the attempt fails, first's count
// is given back (a dead hold takes nothing from that: its release names
// it). giveBack runs with a fresh bounded context.
func retake[T comparable](ctx context.Context, first T,
	acquire func(context.Context) (T, time.Time, bool, error),
	giveBack func(context.Context, T)) (T, time.Time, bool, error) {
	again, sent, ok, err := acquire(ctx)
	if !ok || again == first {
		detached(ctx, func(ctx context.Context) { giveBack(ctx, first) })
	}
	return again, sent, ok, err
}

// detached runs f with a fresh context that keeps ctx's values, not its
// cancellation, bounded by cleanupTimeout: cleanup after a call whose ctx
// ended still reaches Redis, and never hangs on it.
func detached(ctx context.Context, f func(ctx context.Context)) {
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	f(cctx)
}

// cleanupKey marks a cleanup's context (see probePublish).
type cleanupKey struct{}

// releaseContext returns the context a release (Unlock, RUnlock, Release,
// a latch's CountDown and Delete) is sent with: ctx, or, when ctx has ended
// already, a fresh one bounded by the cleanup timeout (see cleanupContext).
// A release is the cleanup after the work: a deferred Unlock(ctx) whose
// request's ctx was cancelled, or whose deadline passed during the work,
// would otherwise send nothing, and the lock would stay taken for its
// whole lease.
func releaseContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx.Err() == nil {
		return ctx, func() {}
	}
	return cleanupContext(ctx)
}

// resendRelease follows a release (one Redis request, which Redis applies
// once: its request id is remembered) that failed with err. When err is not
// a reply from Redis (ctx ended while the call was in flight, or go-redis's
// retries failed on a network error), the release may never have reached
// Redis, while the handle has stopped renewing the hold (or counts one
// hold fewer): without a resend, the lock stayed taken by nobody for its
// whole lease; and a reentrant owner's next acquisition re-entered the
// count left there, and renewed it: an owner that kept re-entering (a
// reader reading on) kept the others out for good. send sends the same
// request again, in the background (the call returns with its ctx) with a
// fresh context bounded by the cleanup timeout; Close waits for it (see
// Client.waits). A resend that fails is not sent a third time, unless
// Redis refused it as busy or loading (see below) (a release
// sent with a cleanup context because its caller's ctx had ended already
// is a first send, and is resent like any other). Nor is a release that
// names no hold (named false: a
// WithOwner handle that holds nothing, whose read of its owner's hold
// failed): landing later, it would release whatever hold the owner has
// then, maybe a later one (TestBlindUnlockResendSparesLaterHold).
//
// A release that Redis refused with a transient reply (BUSY: another
// client's script runs past busy-reply-threshold; LOADING), which did not
// run, is resent too, after a short backoff; so is a resend that Redis
// refuses so, again and again within the cleanup timeout. Left unsent, an
// internal cleanup (an undo, a give-back, a withdrawal), which returns no
// error to anyone, left the hold taken by nobody for its whole lease.
func (c *Client) resendRelease(ctx context.Context, err error, named bool, send func(context.Context) error) {
	if err == nil || (isReplyError(err) && !isBusyOrLoading(err)) || !named || ctx.Value(resentKey{}) != nil {
		return
	}
	// Close waits for the resend when it can still register (see
	// enterResend). Once Close is over it is sent all the same, as a
	// Redlock's release to a closed Client's master is (see
	// Redlock.unlockAll; Close leaves the Redis client open): dropped, it
	// left that master locked by nobody for the hold's lease
	// (TestRedlockUnlockAfterCloseResent).
	registered := c.enterResend()
	// A caller that counts its releases on their way (a Redlock, whose
	// next round is refused where they are not done, see Redlock.takeOff)
	// counts the resend among them.
	f, _ := ctx.Value(flightKey{}).(flight)
	if f != nil {
		f.takeOff()
	}
	go func() {
		if registered {
			defer c.leaveWait()
		}
		if f != nil {
			defer f.land()
		}
		detached(context.WithValue(ctx, resentKey{}, true), func(ctx context.Context) {
			_ = sendAgain(ctx, err, 1, send)
		})
	}()
}

// sendAgain sends again, with ctx, a request Redis applies once (its
// request id is remembered) whose last send failed with err, until Redis
// answers it (see answered): after a send that got no reply (it may have
// run), at once, at most lost more times (a negative lost: paced, as long
// as ctx lasts); while Redis refuses it as busy or loading, or a migrating
// slot refuses it (it did not run), paced as tryAgainHook paces a refused
// script. It returns the last send's error.
func sendAgain(ctx context.Context, err error, lost int, send func(context.Context) error) error {
	var again tryAgainBackoff
	for {
		switch {
		case answered(err):
			return err
		case isBusyOrLoading(err) || refusedInMigration(err):
			if !again.wait(ctx) {
				return err
			}
		case lost == 0 || ctx.Err() != nil:
			return err
		case lost > 0:
			lost--
		case !again.wait(ctx):
			return err
		}
		err = send(ctx)
	}
}

// answered reports whether err (nil included) is Redis's answer to a
// request: not a lost reply, nor a refusal by a busy or loading Redis or
// by a migrating slot, after which the request did not run.
func answered(err error) bool {
	return err == nil || errors.Is(err, redis.Nil) ||
		isReplyError(err) && !isBusyOrLoading(err) && !refusedInMigration(err)
}

// runOnce runs a script whose args carry a request id, which Redis
// remembers with what the run did (a latch's calls; ForceUnlock, see
// fence_force.lua), so that a resend is applied once and answered with the
// first run's result. When the call's outcome is unknown (sent, but no
// reply came: lost, or ctx ended on the way), it is sent once more with a
// fresh context bounded by a cleanup timeout, and the caller learns what
// it did. Without it the caller could not tell, and could not safely call
// again: a new call is a new request (a CountDown counted twice, a
// TrySetCount reporting its own count as another's, a ForceUnlock
// releasing whoever took the lock since).
//
// A call refused by a transient reply (BUSY, LOADING) is sent again so too,
// paced, within that timeout: go-redis resends a call whose reply was lost,
// and the refusal of that resend says nothing of the first run. So is one
// refused by a migrating slot past tryAgainWait (ctx alive), its resend
// ending with ctx too unless it is a release.
//
// A call whose ctx ended before it was sent is not sent (its error), but
// for a release (a latch's CountDown, Delete), which is sent with a fresh
// context as above. Its caller replaced an ended ctx (releaseContext), but
// ctx may end before the send all the same: during the check of a
// cluster's versions (publishCommand), say. A deferred CountDown of a task
// cancelled then was lost, and the count never expires.
func (c *Client) runOnce(ctx context.Context, release bool, s *redis.Script, keys []string, args ...any) *redis.Cmd {
	if ctx.Err() != nil && !release {
		return s.Run(ctx, c.rdb, keys, args...) // not sent: its error
	}
	cmd := s.Run(ctx, c.rdb, keys, args...)
	first := cmd.Err()
	// A call a migrating slot refused has its resend bounded by ctx too,
	// unless it is a release (below).
	bounded := refusedInMigration(first) && !release
	if answered(first) || refusedUntilCtxEnded(first) && !release {
		// (A call refused until ctx ended is not sent again: its resend,
		// refused too while the slot migrates, would hold the call the
		// cleanup timeout past its ctx; see refusedErr.)
		return cmd
	}
	detached(ctx, func(cctx context.Context) {
		if bounded {
			// Its resend, refused too while the slot migrates, ends with
			// the caller's ctx as well (an unknown outcome, ctx's error):
			// not the cleanup timeout past it.
			var cancel context.CancelFunc
			cctx, cancel = context.WithCancel(cctx)
			defer cancel()
			defer context.AfterFunc(ctx, cancel)()
		}
		_ = sendAgain(cctx, first, 1, func(ctx context.Context) error {
			next := s.Run(ctx, c.rdb, keys, args...)
			if err := next.Err(); !isBusyOrLoading(err) && !refusedInMigration(err) {
				cmd = next // an answer, or none: this send may have run
			}
			return next.Err()
		})
	})
	if err := cmd.Err(); isReplyError(err) && !answered(err) {
		// Still a refusal (busy, loading, a migrating slot's), after a
		// send that may have run: the first send, its reply lost, whose
		// go-redis resend the refusal answered. Returned as it is, a
		// ForceUnlock that released a hold said it did not run, and an
		// operator calling again released whoever took the lock since;
		// a CountDown so counted twice. The outcome is unknown; a resend
		// bounded by the caller's ctx (above) that ctx ended has its
		// error (a cancelled ctx reported DeadlineExceeded).
		end := context.DeadlineExceeded
		if bounded && ctx.Err() != nil {
			end = ctx.Err()
		}
		cmd.SetErr(refusedErr{end})
	}
	return cmd
}

// isBusyOrLoading reports whether err is a transient refusal by Redis (BUSY,
// LOADING): the command did not run, and may be sent again.
func isBusyOrLoading(err error) bool {
	if !isReplyError(err) {
		return false
	}
	code := replyCode(err)
	return code == "BUSY" || code == "LOADING"
}

// resentKey marks the context of a resend (see resendRelease).
type resentKey struct{}

// flightKey carries a flight, which counts the releases sent with the
// context and their resends while they are on their way (see
// resendRelease, Redlock.takeOff).
type flightKey struct{}

// flight counts releases on their way: takeOff when one starts, land when
// it is done.
type flight interface {
	takeOff()
	land()
}

// cleanupContext returns a fresh context that keeps ctx's values, not its
// cancellation, bounded by cleanupTimeout, for a cleanup.
func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithValue(context.WithoutCancel(ctx), cleanupKey{}, true), cleanupTimeout)
}

// closedAfter is called by a reentrant handle whose acquisition succeeded,
// once it has ended the hold it tracked before (see watchdog.supersede):
// Close may have begun since the attempt.
// When the Client was closed meanwhile, the call was in progress at Close
// (see Client.acquire): closedAfter returns a cleanup that runs giveBack
// (which releases what the acquisition took) with a fresh bounded context,
// to be run once the handle's mutex is released, and the caller returns
// ErrClosed. Otherwise it returns nil.
func (c *Client) closedAfter(ctx context.Context, giveBack func(context.Context)) (cleanup func()) {
	if !c.closed.Load() {
		return nil
	}
	return func() {
		detached(ctx, giveBack)
	}
}

// inFlight counts calls on their way; its owner's mutex guards it.
type inFlight struct {
	n    int
	none chan struct{} // made when n rises from 0, closed when it falls back
}

func (f *inFlight) add() {
	if f.n == 0 {
		f.none = make(chan struct{})
	}
	f.n++
}

func (f *inFlight) done() {
	if f.n--; f.n == 0 {
		close(f.none)
	}
}

// landed returns a channel closed once no call is on its way, or nil when
// none is now.
func (f *inFlight) landed() <-chan struct{} {
	if f.n == 0 {
		return nil
	}
	return f.none
}
