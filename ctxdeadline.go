package redlatch

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
	"weak"

	"github.com/redis/go-redis/v9"
)

// go-redis sets the deadline of each read from the client's ReadTimeout (3s
// by default), and from the call's ctx only when ContextTimeoutEnabled is on,
// which it is not by default. Without it, a Lock whose ctx ends while Redis
// does not answer (a frozen server, a link that drops packets) would return
// only after the ReadTimeout, and the undo of its unanswered attempt, which
// has a fresh bounded ctx, after another one: 10s for a 300ms ctx.
//
// So on a *redis.Client with the option off (a sentinel failover client
// too) New installs a deadlineHook, which sends redlatch's script calls and
// reads through a clone of the client with the option on. The clone is a
// WithTimeout clone with the client's own timeouts: it shares the client's
// connection pool (its connections, limits and dial hooks), and its options
// are its own copy. go-redis runs the hooks added later closer to the
// server: the hooks the user added before New (tracing, metrics) see every
// call as before, and the hooks added after New do not see the routed
// ones, which go round them. Only redlatch's calls are routed (EVALSHA,
// EVAL or SCRIPT LOAD of a script made with newScript, alone or first in a
// pipeline; and its other calls, marked by own): the user's
// commands are the client's business.
//
// A *redis.ClusterClient with the option off sends each command, and each
// node's share of a pipeline, through the hooks of a node client of its
// own, one per node, which has the option off too; its WithTimeout would
// not be a cluster client. So each node client that redlatch's calls go to
// gets a deadlineHook (see hookNode and clusterDeadlineHook), which routes
// them through a clone of the node client; the cluster client follows the
// redirects of the replies, as for any call. The hooks on the cluster
// client, and those on its node clients from before New, see every call.
//
// The other hook New gives every cluster client, tryAgainHook (at the end
// of this file), sends redlatch's script calls again while a migrating
// slot refuses them.

// scripts are the SHA1 digests and the sources of every script made with
// newScript: the calls deadlineHook routes.
var scripts = make(map[string]struct{})

// newScript is redis.NewScript for redlatch's own scripts (see scripts).
func newScript(src string) *redis.Script {
	s := redis.NewScript(src)
	scripts[s.Hash()] = struct{}{}
	scripts[src] = struct{}{}
	return s
}

// isScriptCall reports whether cmd runs one of redlatch's scripts, or
// loads it (the watchdog's SCRIPT LOAD after NOSCRIPT).
func isScriptCall(cmd redis.Cmder) bool {
	args := cmd.Args()
	if len(args) < 2 {
		return false
	}
	switch name, _ := args[0].(string); name {
	case "evalsha", "eval":
	case "script":
		if len(args) < 3 || args[1] != "load" {
			return false
		}
		args = args[1:]
	default:
		return false
	}
	s, _ := args[1].(string)
	_, ok := scripts[s]
	return ok
}

// deadlineHook routes redlatch's script calls on a *redis.Client with
// ContextTimeoutEnabled off through clone, which has it on (see above).
// A go-redis client keeps its hooks for good: it gets one deadlineHook,
// installed by the first Client on it.
type deadlineHook struct {
	clone *redis.Client
	// node is set on a node client of a *redis.ClusterClient, whose
	// pipelines the cluster client sends through the node's hooks (see
	// ProcessPipelineHook).
	node bool
}

// routed marks the ctx of a call that is not to be routed (again): see
// unrouted.
type routed struct{}

// ownCall marks the ctx of redlatch's own calls that are not scripts: its
// reads, a MULTI of read commands (see Client.onMaster), and the PUBLISH of
// a release its script could not announce: deadlineHook routes them too.
type ownCall struct{}

// own returns ctx for redlatch's own calls that are not scripts (see
// ownCall).
func own(ctx context.Context) context.Context {
	return context.WithValue(ctx, ownCall{}, true)
}

// isOwnTx reports whether cmds are the transaction of one of redlatch's
// reads: MULTI, the reads, EXEC, sent with a ctx from own.
func isOwnTx(ctx context.Context, cmds []redis.Cmder) bool {
	return len(cmds) > 2 && ctx.Value(ownCall{}) != nil &&
		cmds[0].Name() == "multi" && cmds[len(cmds)-1].Name() == "exec"
}

// unrouted returns ctx marked routed{}: the calls made with it are not
// routed (again). They are:
//   - the calls routed through a clone already (see send);
//   - the calls on a connection redlatch pinned (redis.Client.Conn, with
//     the client's hooks and options), for a WAIT must follow on the
//     connection that wrote, and the clone would send a script on one of
//     its own. Their reads keep the client's ReadTimeout. (A pinned
//     connection of the clone would end them with their ctx, but the hooks
//     the user added would not see its calls: every renewal under
//     WithReplicaSync with a sync timeout above the ReadTimeout.);
//   - the calls handed back to a cluster client's own path (a redirect
//     followed, a pipeline not routed). A node client opens a connection
//     there with the call's ctx, and sets it up through its hooks (HELLO,
//     with the password): a ctx from own would have the node's
//     deadlineHook send that HELLO on a connection of its clone, and leave
//     the new one unauthenticated.
func unrouted(ctx context.Context) context.Context {
	return context.WithValue(ctx, routed{}, true)
}

// deadlineHooks holds each go-redis client with a deadlineHook (weakly: a
// go-redis client dropped by its user is not kept). Its values hold
// nothing: the hook's clone shares its client's internals, and a value
// kept here would keep the client for good.
var deadlineHooks sync.Map // weak.Pointer[redis.Client] → struct{}

// hookOnce stores v for rdb in m, a map of go-redis clients to their hook
// (or what it needs), unless m has a value for rdb already, and returns the
// value m holds and whether this call stored it: the caller then adds its
// hook to rdb. A go-redis client keeps its hooks for good, so it gets one
// of each kind, shared by its Clients. m is keyed weakly, and its entry
// goes when rdb is collected: an application that opens and drops clients
// does not grow it.
func hookOnce[C redis.Client | redis.ClusterClient](m *sync.Map, rdb *C, v any) (any, bool) {
	key := weak.Make(rdb)
	held, loaded := m.LoadOrStore(key, v)
	if !loaded {
		runtime.AddCleanup(rdb, func(key weak.Pointer[C]) { m.Delete(key) }, key)
	}
	return held, !loaded
}

// honourDeadlines makes the deadlines of redlatch's calls on rdb reach their
// reads when rdb has ContextTimeoutEnabled off: on a *redis.Client it
// installs rdb's deadlineHook; on a *redis.ClusterClient, its
// clusterDeadlineHook, which gives each node client that redlatch's calls
// go to a deadlineHook of its own (see hookNode). It reports whether the
// node clients that redlatch calls directly need theirs too (see
// Client.node).
func honourDeadlines(rdb redis.UniversalClient) (hookNodes bool) {
	switch r := rdb.(type) {
	case *redis.ClusterClient:
		o := r.Options()
		if o.ContextTimeoutEnabled || o.ReadTimeout < 0 {
			return false
		}
		if _, first := hookOnce(&clusterDeadlineHooks, r, struct{}{}); first {
			// The node clients the cluster creates from now on (after a
			// MOVED to a node it did not know, say) get theirs at once;
			// those it has already, when a call goes to them.
			r.OnNewNode(hookNode)
			r.AddHook(&clusterDeadlineHook{cc: r, info: newCmdInfoLoad(r)})
		}
		return true
	case *redis.Client:
		o := r.Options()
		if o.ContextTimeoutEnabled || o.ReadTimeout < 0 {
			// With the option on, nothing to route. A ReadTimeout of -2
			// (go-redis stores it as -1) disables read deadlines, ctx's
			// too: the user's choice, for connections that take none.
			// Left alone.
			return false
		}
		if _, first := hookOnce(&deadlineHooks, r, struct{}{}); first {
			r.AddHook(newDeadlineHook(r, false))
		}
	}
	return false
}

// node returns n, a node client of c's cluster client that redlatch calls
// directly (a master, for a script and its WAIT, or its version), after
// giving it its deadlineHook when the cluster client has
// ContextTimeoutEnabled off.
func (c *Client) node(n *redis.Client) *redis.Client {
	if c.hookNodes {
		hookNode(n)
	}
	return n
}

// newDeadlineHook returns the deadlineHook of r, which has
// ContextTimeoutEnabled off; node is set for a node client of a
// *redis.ClusterClient.
func newDeadlineHook(r *redis.Client, node bool) *deadlineHook {
	o := r.Options()
	clone := r.WithTimeout(o.ReadTimeout) // sets both timeouts to it
	co := clone.Options()                 // the clone's own copy
	co.WriteTimeout = o.WriteTimeout
	co.ContextTimeoutEnabled = true
	return &deadlineHook{clone: clone, node: node}
}

func (h *deadlineHook) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessHook routes a command that runs one of redlatch's scripts, or
// that redlatch marked as its own (see own).
func (h *deadlineHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !isScriptCall(cmd) && ctx.Value(ownCall{}) == nil || ctx.Value(routed{}) != nil {
			return next(ctx, cmd)
		}
		return h.clone.Process(unrouted(ctx), cmd)
	}
}

// ProcessPipelineHook routes a pipeline whose first command is one of
// redlatch's scripts (a renewal, a script and its WAIT): a user's pipeline
// never starts so, nor a transaction (MULTI comes first); and the
// transaction of one of redlatch's reads (see routeTx).
func (h *deadlineHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) == 0 || ctx.Value(routed{}) != nil {
			return next(ctx, cmds)
		}
		if h.node {
			return h.routeNodePipeline(ctx, cmds, next)
		}
		if isOwnTx(ctx, cmds) {
			return h.routeTx(ctx, cmds)
		}
		if !isScriptCall(cmds[0]) {
			return next(ctx, cmds)
		}
		// The error next would return: go-redis's pipeline returns the
		// first failed command's, a reply error (NOSCRIPT, ...) too.
		return send(ctx, h.clone.Pipeline(), cmds)
	}
}

// routeNodePipeline is ProcessPipelineHook on a node client of a cluster,
// whose cluster client sends a cluster pipeline through it, each node's
// share of it in turn, and follows the redirects of its commands once
// next returns.
//
// A transaction goes to next: a cluster client takes a node hook that
// serves a transaction itself for a failed one (the cluster-level
// clusterDeadlineHook routes the transactions of redlatch's reads
// instead). A pipeline that starts with one of redlatch's scripts (a
// renewal, a script and its WAIT), or with ASKING and one of them (the
// cluster client follows an -ASK reply so, to the node importing the
// slot), is sent through the clone. Its scripts that were redirected
// (MOVED, ASK, see followed) go to next then, each with its ASKING, whose
// replies the cluster client follows; so do those that failed with no
// reply while ctx is live (a connection refused): the cluster client
// retries them on the node it picks. Not those whose read reached ctx's
// deadline: ctx may not be done yet when the read ends, and next's read
// would wait for the ReadTimeout. Nor any other command: a WAIT sent again
// on another connection would count the replicas of that connection's
// writes, none.
//
// The hook returns the first error of the pipeline's commands (but
// ASKING's) when every one of them failed, else nil: the cluster client
// sets a node hook's error on each command of a cluster pipeline that has
// none, a reply too; and it takes the error of its own pipeline of ASKING
// and one command for that command's.
func (h *deadlineHook) routeNodePipeline(ctx context.Context, cmds []redis.Cmder, next redis.ProcessPipelineHook) error {
	asking := len(cmds) > 1 && isAsking(cmds[0]) && isScriptCall(cmds[1])
	if !isScriptCall(cmds[0]) && !asking {
		return next(unrouted(ctx), cmds)
	}
	_ = send(ctx, h.clone.Pipeline(), cmds)
	// A script pipelined with its WAIT (see runOnWithWait and
	// renewSyncedOn) is not sent again alone: the WAIT's count, answered
	// already, would be taken for the replicas of a write it came before
	// (a script refused with TRYAGAIN, then run by the resend once the slot
	// stopped migrating, was reported replicated). Its caller sends the
	// script and WAIT again together, or fails the call.
	synced := slices.ContainsFunc(cmds, func(cmd redis.Cmder) bool { return cmd.Name() == "wait" })
	var again []redis.Cmder
	var first error
	failed, total := 0, 0
	for i, cmd := range cmds {
		if isAsking(cmd) {
			continue
		}
		total++
		err := cmd.Err()
		if err == nil || errors.Is(err, redis.Nil) {
			continue
		}
		failed++
		if first == nil {
			first = err
		}
		if !synced && isScriptCall(cmd) && (followed(err) || !isReplyError(err) && !ctxEnded(ctx)) {
			if i > 0 && isAsking(cmds[i-1]) {
				cmds[i-1].SetErr(nil)
				again = append(again, cmds[i-1])
			}
			cmd.SetErr(nil)
			again = append(again, cmd)
		}
	}
	if len(again) > 0 {
		return next(unrouted(ctx), again)
	}
	if failed < total {
		return nil
	}
	return first
}

// isAsking reports whether cmd is an ASKING, which a cluster client sends
// before a command that an -ASK reply sent to the node importing its slot.
func isAsking(cmd redis.Cmder) bool { return cmd.Name() == "asking" }

// clusterDeadlineHooks holds each cluster client with a
// clusterDeadlineHook, and nodeDeadlineHooks each of its node clients with
// a deadlineHook, with the sync.Once that adds it (see hookOnce and
// hookNode).
var (
	clusterDeadlineHooks sync.Map // weak.Pointer[redis.ClusterClient] → struct{}
	nodeDeadlineHooks    sync.Map // weak.Pointer[redis.Client] → *sync.Once
)

// hookNode gives the node client node of a cluster client its deadlineHook,
// once, and returns when the hook is in place: the first calls to a node
// may come at once, and one that went out while another was adding the
// hook would not be routed.
func hookNode(node *redis.Client) {
	once, ok := nodeDeadlineHooks.Load(weak.Make(node))
	if !ok {
		once, _ = hookOnce(&nodeDeadlineHooks, node, new(sync.Once))
	}
	once.(*sync.Once).Do(func() { node.AddHook(newDeadlineHook(node, true)) })
}

// clusterDeadlineHook is the hook of a *redis.ClusterClient with
// ContextTimeoutEnabled off. The cluster client sends each command, and
// each node's share of a pipeline, through the hooks of the node client of
// its master, where a deadlineHook routes redlatch's calls as on a
// *redis.Client (with the client's redirects followed, see
// routeNodePipeline); this hook gives that node client its deadlineHook
// before the call goes on. A transaction, which a node hook cannot serve,
// is routed here (see routeTx).
type clusterDeadlineHook struct {
	cc   *redis.ClusterClient
	info *cmdInfoLoad
}

// cmdInfoLoad bounds by a call's ctx the load of a cluster client's
// command table (COMMAND), which go-redis runs before the first command it
// routes by its request policy (every command, unless
// DisableRoutingPolicies; and, with ReadOnly, to tell a read), with
// context.Background() when ContextTimeoutEnabled is off: on up to 3 nodes
// in turn, each until the ReadTimeout when it does not answer, neither
// routed nor bounded by anything redlatch could pass it. Until a load
// succeeds, every command tries it again. So redlatch's calls wait for it
// in the background (one load at a time) and go on when it ends, or fail
// with their ctx when that ends first; the load goes on, up to 3
// ReadTimeouts.
type cmdInfoLoad struct {
	load func() bool // loads the table; reports whether it is known loaded
	// slowAt is how long a load lasts at least when it met a node that does
	// not answer (a read or a dial timed out): go-redis's own load, which a
	// call going on would run, would wait as long again, unbounded.
	slowAt time.Duration
	mu     sync.Mutex
	done   bool
	slow   bool          // the last load failed slowly (see slowAt)
	busy   chan struct{} // closed when the load in flight ends
}

// newCmdInfoLoad returns cc's cmdInfoLoad, or nil when cc routes no
// command by the table.
func newCmdInfoLoad(cc *redis.ClusterClient) *cmdInfoLoad {
	if o := cc.Options(); o.DisableRoutingPolicies && !o.ReadOnly {
		return nil
	}
	resolver := cc.NewDynamicResolver()
	probe := redis.NewCmd(context.Background(), "evalsha")
	// A ReadTimeout of 0 (-1 given: no read deadline) bounds no read: a
	// load that failed then met a dial timeout, or failed at once (a
	// refusal, NOPERM), and a slowAt of 0 would call every failed load slow
	// and send COMMAND again and again while a call's ctx lasts.
	o := cc.Options()
	slowAt := o.DialTimeout
	if o.ReadTimeout > 0 {
		slowAt = min(slowAt, o.ReadTimeout)
	}
	return &cmdInfoLoad{slowAt: slowAt, load: func() bool {
		// A policy comes only from the loaded table (from Redis 7 on, which
		// has one for every command; on Redis 6.2 each call waits for
		// another look, at once once the table is loaded).
		return resolver.GetCommandPolicy(context.Background(), probe) != nil
	}}
}

// wait returns once the command table has been loaded, or a load ended,
// or with ctx's error when ctx ends first.
func (l *cmdInfoLoad) wait(ctx context.Context) error {
	if l == nil {
		return nil
	}
	for {
		l.mu.Lock()
		if l.done {
			l.mu.Unlock()
			return nil
		}
		busy := l.busy
		if busy == nil {
			busy = make(chan struct{})
			l.busy = busy
			go func() {
				start := time.Now()
				done := l.load()
				l.mu.Lock()
				l.done, l.busy = done, nil
				l.slow = !done && l.slowAt > 0 && time.Since(start) >= l.slowAt
				l.mu.Unlock()
				close(busy)
			}()
		}
		l.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return ctx.Err()
		}
		// A load that failed on nodes that do not answer: going on, the
		// call would run go-redis's own load, as slow and bounded by
		// nothing. Another one in the background, while ctx lasts. (A
		// load that ended at once, from the table loaded on Redis 6.2,
		// which gives no policy, or refused, goes on.)
		// A ctx with no deadline bounds nothing that the call going on
		// would overrun: it goes on (go-redis's ReadTimeouts bound it),
		// not load after load for as long as the nodes do not answer.
		l.mu.Lock()
		slow := l.slow && !l.done
		l.mu.Unlock()
		if _, bounded := ctx.Deadline(); !slow || !bounded {
			return nil
		}
	}
}

func (h *clusterDeadlineHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *clusterDeadlineHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if (isScriptCall(cmd) || ctx.Value(ownCall{}) != nil) && ctx.Value(routed{}) == nil {
			if err := h.hookMasterOf(ctx, cmd); err != nil {
				return err
			}
			if err := h.info.wait(ctx); err != nil {
				return err
			}
		}
		return next(ctx, cmd)
	}
}

// ProcessPipelineHook routes the transactions of redlatch's reads. Its
// pipelines (the watchdog's renewals) go on: each goes to one master, whose
// node client got its deadlineHook when the watchdog asked for that master
// (see Client.node).
func (h *clusterDeadlineHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) > 0 && ctx.Value(routed{}) == nil && isOwnTx(ctx, cmds) {
			return h.routeTx(ctx, cmds, next)
		}
		return next(ctx, cmds)
	}
}

// hookMasterOf gives the node client of the master of cmd's first key its
// deadlineHook (see hookNode). A command with no key (SCRIPT LOAD, which the
// cluster client sends to every master) goes to nodes that have one already.
// The load of the slot map that MasterForKey runs when the cluster client
// has none yet (its first call) is redlatch's call too (own): its CLUSTER
// SLOTS is routed at the seed node's client. When that load fails and ctx
// has ended, hookMasterOf returns its error, the call's: the cluster client
// would load the map again, not routed, and wait for the ReadTimeout.
func (h *clusterDeadlineHook) hookMasterOf(ctx context.Context, cmd redis.Cmder) error {
	if key := firstKey(cmd); key != "" {
		node, err := h.cc.MasterForKey(own(ctx), key)
		if err == nil {
			hookNode(node)
		} else if ctxEnded(ctx) {
			return err
		}
	}
	return nil
}

// routeTx sends the transaction of one of redlatch's reads through a clone
// of its master's node client with ContextTimeoutEnabled on (see
// deadlineHook.routeTx). A redirected one (the slot moved, or is moving),
// or one that failed with no reply while ctx is live, goes to next then:
// the cluster client follows the redirect, or picks a node.
func (h *clusterDeadlineHook) routeTx(ctx context.Context, cmds []redis.Cmder, next redis.ProcessPipelineHook) error {
	node, err := h.cc.MasterForKey(own(ctx), firstKey(cmds[1]))
	if err != nil && ctxEnded(ctx) { // see hookMasterOf
		for _, cmd := range cmds {
			cmd.SetErr(err)
		}
		return err
	}
	if err != nil {
		return next(unrouted(ctx), cmds)
	}
	err = newDeadlineHook(node, true).routeTx(ctx, cmds)
	if err == nil || !redirected(cmds) && (isReplyError(err) || ctxEnded(ctx)) { // see routeNodePipeline
		return err
	}
	for _, cmd := range cmds {
		cmd.SetErr(nil)
	}
	return next(unrouted(ctx), cmds)
}

// redirected reports whether a command of cmds, a transaction, was
// redirected (see followed): its EXEC then fails with EXECABORT.
func redirected(cmds []redis.Cmder) bool {
	for _, cmd := range cmds {
		if followed(cmd.Err()) {
			return true
		}
	}
	return false
}

// followed reports whether err is a reply that a cluster client follows
// (MOVED, ASK) or retries after a pause (TRYAGAIN, CLUSTERDOWN, LOADING,
// READONLY and MASTERDOWN: a slot migrating, a failover).
func followed(err error) bool {
	if !isReplyError(err) {
		return false
	}
	switch replyCode(err) {
	case "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY", "MASTERDOWN":
		return true
	}
	return false
}

// replyCode returns the code that starts the reply error err ("MOVED",
// "TRYAGAIN", ...).
func replyCode(err error) string {
	code, _, _ := strings.Cut(err.Error(), " ")
	return code
}

// firstKey returns the first key cmd names: a script's first KEYS entry,
// or else its first argument; "" when it has none.
func firstKey(cmd redis.Cmder) string {
	args := cmd.Args()
	i := 1
	switch cmd.Name() {
	case "evalsha", "eval":
		if n, _ := args[2].(int); n == 0 {
			return ""
		}
		i = 3
	}
	if len(args) <= i {
		return ""
	}
	key, _ := args[i].(string)
	return key
}

// send queues cmds on pipe, a pipeline of the clone, and runs it with ctx
// marked routed; the pipeline sets each command's reply. A command sent
// again (a cluster client follows an -ASK reply with the same command) has
// its last error cleared first: a pipeline that fails sets its error only
// on the commands that have none.
func send(ctx context.Context, pipe redis.Pipeliner, cmds []redis.Cmder) error {
	ctx = unrouted(ctx)
	for _, cmd := range cmds {
		cmd.SetErr(nil)
		_ = pipe.Process(ctx, cmd) // queued
	}
	_, err := pipe.Exec(ctx)
	return err
}

// routeTx sends the transaction of one of redlatch's reads (MULTI, the
// reads, EXEC: see isOwnTx) through the clone, which wraps the reads in a
// MULTI and EXEC of its own. The caller's MULTI and EXEC get the error of
// a transaction that did not go through, as go-redis sets it.
func (h *deadlineHook) routeTx(ctx context.Context, cmds []redis.Cmder) error {
	err := send(ctx, h.clone.TxPipeline(), cmds[1:len(cmds)-1])
	var reply redis.Error // a command's reply (redis.Nil too): not theirs
	if err != nil && !errors.As(err, &reply) {
		cmds[0].SetErr(err)
		cmds[len(cmds)-1].SetErr(err)
	}
	return err
}

// tryAgainHooks holds each cluster client with a tryAgainHook (see
// hookOnce).
var tryAgainHooks sync.Map // weak.Pointer[redis.ClusterClient] → struct{}

// tryAgainWait bounds how long tryAgainHook sends a script call again.
const tryAgainWait = 5 * time.Second

// hookTryAgain gives the cluster client cc its tryAgainHook, once.
func hookTryAgain(cc *redis.ClusterClient) {
	if _, first := hookOnce(&tryAgainHooks, cc, struct{}{}); first {
		cc.AddHook(tryAgainHook{})
	}
}

// tryAgainHook sends one of redlatch's script calls again when a cluster
// refuses it with TRYAGAIN. While a slot migrates, Redis refuses so a
// command naming several keys of the slot when one of them is missing
// where it lands, and redlatch's scripts name several (a lock's hash and
// fence key, and a release's wake-up channel, which is never a key in the
// keyspace): until the slot itself moves, every Unlock of a lock in it,
// and every Lock of a lock not held, is refused. go-redis tries again only
// up to its MaxRedirects (3 by default, about 40 ms); this hook goes on,
// with a backoff from 10 ms to 200 ms, until ctx ends or tryAgainWait
// passes. It sends a call again on a MOVED or ASK too: go-redis counts its
// retries of a TRYAGAIN against MaxRedirects, and returns the redirection
// that its last attempt got (the slot moved meanwhile) unfollowed. A
// refused script did not run: sending it again is safe.
type tryAgainHook struct{}

func (tryAgainHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (tryAgainHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (tryAgainHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if !refusedInMigration(err) || !isScriptCall(cmd) || ctx.Value(noTryAgain{}) != nil {
			return err
		}
		var again tryAgainBackoff
		for refusedInMigration(err) {
			if !again.wait(ctx) {
				if ctx.Err() != nil {
					// ctx ended while the slot migrates: the call returns
					// ctx's error, as go-redis's own retries do when it ends
					// during their backoff. A release is then one whose ctx
					// ended on its way, sent again with a fresh context (see
					// resendRelease), an acquisition one whose outcome is
					// unknown, undone: the refusal returned as it was, a
					// reply, said the call was over, and a release was never
					// sent again, its hold left in Redis for its lease.
					// It is marked refused all the same: an acquisition so
					// is undone in the background (see refusedErr).
					err = refusedErr{ctx.Err()}
					cmd.SetErr(err)
				}
				break
			}
			cmd.SetErr(nil)
			err = next(ctx, cmd)
		}
		return err
	}
}

// refusedErr is the error of a script call that a migrating slot refused
// until its ctx ended (see tryAgainHook): ctx's error, which it matches
// (errors.Is), for a call whose last send did not run. A release so is
// sent again (see resendRelease: its hold is still there), and an
// acquisition is undone in the background (see Client.cleanupAfter): an
// earlier send of it, inside go-redis's retries (a lost reply), may have
// run, and its undo, a release script, is refused too while the slot
// migrates, for the whole cleanup timeout, which the call must not wait
// for after its ctx has ended.
type refusedErr struct{ ctxErr error }

func (e refusedErr) Error() string { return e.ctxErr.Error() }

func (e refusedErr) Unwrap() error { return e.ctxErr }

// refusedUntilCtxEnded reports whether err is a refusedErr (a script call
// refused until its ctx ended, see tryAgainHook): its last send did not run.
func refusedUntilCtxEnded(err error) bool {
	var r refusedErr
	return errors.As(err, &r)
}

// noTryAgain, as a ctx key, makes tryAgainHook return a TRYAGAIN at once:
// the watchdog sends a refused batch again one key at a time instead (see
// renewKeyByKey).
type noTryAgain struct{}

// tryAgainBackoff paces the sends of a script call refused with TRYAGAIN
// (see tryAgainHook), and the resends of a release refused by a busy or
// loading Redis (see resendRelease): 10 ms before the first, doubling up to 200 ms, for
// up to tryAgainWait from the first refusal. Its zero value is ready.
type tryAgainBackoff struct {
	end   time.Time
	delay time.Duration
}

// wait sleeps before the next send and reports whether to send: false,
// at once, when ctx ends or the send would come after tryAgainWait.
func (b *tryAgainBackoff) wait(ctx context.Context) bool {
	if b.end.IsZero() {
		b.end, b.delay = time.Now().Add(tryAgainWait), 10*time.Millisecond
	}
	if !time.Now().Add(b.delay).Before(b.end) {
		return false
	}
	t := time.NewTimer(b.delay)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	}
	b.delay = min(2*b.delay, 200*time.Millisecond)
	return true
}

// isTryAgain reports whether err is a TRYAGAIN reply (see tryAgainHook).
func isTryAgain(err error) bool {
	return isReplyError(err) && replyCode(err) == "TRYAGAIN"
}

// refusedInMigration reports whether err is a reply by which a migrating
// slot refused a command, which did not run: TRYAGAIN, or a MOVED or ASK
// that go-redis returns itself when its MaxRedirects ran out on it. Its
// retries of a TRYAGAIN count against that bound, so the slot moving
// during the last of them (the old master then answers MOVED) or the last
// of a script's keys moving (ASK) ended the call with that redirection,
// not followed (see tryAgainHook).
func refusedInMigration(err error) bool {
	if !isReplyError(err) {
		return false
	}
	switch replyCode(err) {
	case "TRYAGAIN", "MOVED", "ASK":
		return true
	}
	return false
}
