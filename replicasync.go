package redlatch

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// waitMargin is how much shorter than the connection's read timeout the
// WAIT timeout must be for the script and WAIT to share one pipelined round
// trip; else they are sent one after the other on one pinned connection.
const waitMargin = 100 * time.Millisecond

// waitFits reports whether a WAIT of timeout fits within the read timeout
// rt of a pipeline (see waitMargin). Written as timeout < rt − waitMargin:
// timeout + waitMargin overflows for a timeout near math.MaxInt64, which
// then seemed to fit.
func waitFits(timeout, rt time.Duration) bool {
	return rt <= 0 || timeout < rt-waitMargin
}

// waitTimeout is the timeout of a WAIT of ms milliseconds sent on its own
// (Cmdable.Wait): go-redis reads its reply for the timeout plus 10s, which
// must not overflow to a negative Duration (then no read deadline is set,
// and the WAIT outlives its ctx: Lock hung past it).
func waitTimeout(ms int64) time.Duration {
	return time.Duration(min(ms, int64((math.MaxInt64-10*time.Second)/time.Millisecond))) * time.Millisecond
}

// runSynced runs script s with keys and args on the master holding keys[0]
// and, when the Client was made WithReplicaSync(replicas, timeout), follows
// it on the same connection with WAIT replicas timeout — in the same
// pipeline, so in one round trip, whenever the WAIT timeout fits within the
// connection's read timeout.
//
// It returns the script's command (its reply, or its error: a reply error of
// the script, or a network or context error after which the script's effect
// is unknown) and, when the script ran, the number of replicas that
// acknowledged its writes, or the error of WAIT. acked is -1 when replica
// sync is off: then runSynced is s.Run.
//
// An empty script cache (NOSCRIPT) is handled as by Script.Run: the
// pipeline is sent again with EVAL, which also caches the script. On a
// cluster, the pipeline goes straight to the master of keys[0]'s slot (WAIT
// must run on the connection that wrote); a MOVED reply reloads the slot
// map and the pipeline is sent again, up to redirectAttempts times. An ASK
// reply (the slot is migrating, and the keys have moved already) sends it
// once to the node the reply names, after ASKING, on a connection of its
// own: the slot map names that node only once the migration ends. A
// TRYAGAIN reply (the slot migrates, a key is missing where the script
// landed) sends it again after a pause, as tryAgainHook does.
func (c *Client) runSynced(ctx context.Context, s *redis.Script, keys []string, args ...any) (cmd *redis.Cmd, acked int64, waitErr error) {
	if c.opts.replicas <= 0 {
		return s.Run(ctx, c.rdb, keys, args...), -1, nil
	}
	asked := ""               // the node an -ASK reply named (a slot migrating there)
	var again tryAgainBackoff // the sends after TRYAGAIN replies
	for attempt := 0; ; attempt++ {
		node, err := c.masterFor(ctx, keys[0])
		if err != nil {
			cmd = redis.NewCmd(ctx)
			cmd.SetErr(err)
			return cmd, 0, nil
		}
		if asked != "" {
			// The slot's keys are (to be) on the importing node, which runs
			// the script after ASKING; WAIT must follow on its connection.
			// The slot map does not name it until the migration ends.
			opt := *node.Options()
			opt.Addr = asked
			// A client of redlatch's own, with no hook: its reads end by
			// ctx's deadline themselves (see honourDeadlines).
			opt.ContextTimeoutEnabled = true
			node = redis.NewClient(&opt)
		}
		cmd, acked, waitErr = c.runOnWithWait(ctx, node, asked != "", s, keys, args)
		if asked != "" {
			_ = node.Close()
		}
		if err := cmd.Err(); c.cluster != nil && err != nil && !isReplyError(err) && ctx.Err() == nil {
			// The master may be gone, a replica promoted in its place:
			// the next attempt asks the new map (go-redis would try
			// another node and be redirected).
			c.cluster.ReloadState(ctx)
		}
		if c.cluster != nil && isTryAgain(cmd.Err()) && again.wait(ctx) {
			// The slot migrates and a key of the script is missing where
			// it landed: the script did not run. It is sent again after a
			// pause, as tryAgainHook does for the scripts the cluster
			// client sends (which runSynced goes round), until the slot
			// moves, ctx ends or tryAgainWait passes.
			attempt-- // not a redirect
			if asked != "" {
				// Nor was the -ASK that sent it to the importing node:
				// while a free lock's slot migrates, the old master
				// answers -ASK and the new one TRYAGAIN at every send,
				// and redirectAttempts of those ended the wait with the
				// ASK reply after a few hundred ms.
				attempt--
			}
			asked = ""
			continue
		}
		if c.cluster != nil && isTryAgain(cmd.Err()) && ctx.Err() != nil {
			// Refused until ctx ended, as tryAgainHook reports it: an
			// earlier send inside go-redis's retries (a lost reply) may
			// have run, so the acquisition is undone, in the background
			// (see refusedErr).
			cmd.SetErr(refusedErr{ctx.Err()})
			return cmd, acked, waitErr
		}
		if c.cluster == nil || attempt == redirectAttempts || !isRedirect(cmd.Err()) {
			return cmd, acked, waitErr
		}
		if addr, ok := askTarget(cmd.Err()); ok && asked == "" {
			asked = addr
			continue
		}
		asked = ""
		// The slot moved (failover, resharding). ReloadState only starts a
		// reload in the background: give it a moment, then ask again.
		c.cluster.ReloadState(ctx)
		t := time.NewTimer(time.Duration(attempt+1) * 50 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return cmd, acked, waitErr
		}
	}
}

// masterFor returns the node client that must run a script on key: the
// Client's own Redis client, or on a cluster the master of key's slot.
func (c *Client) masterFor(ctx context.Context, key string) (*redis.Client, error) {
	if c.cluster != nil {
		node, err := c.cluster.MasterForKey(ctx, key)
		if err != nil {
			return nil, err
		}
		return c.node(node), nil
	}
	if rc, ok := c.rdb.(*redis.Client); ok {
		return rc, nil
	}
	return nil, invalidArg("redis client", fmt.Sprintf("must be a *redis.Client or *redis.ClusterClient for WithReplicaSync, not %T", c.rdb))
}

// redirectAttempts is how many times runSynced sends a pipeline again after
// a MOVED or ASK reply, waiting 50ms, 100ms, … for the slot map to reload.
const redirectAttempts = 5

// askTarget returns the address an -ASK reply names.
func askTarget(err error) (string, bool) {
	rest, ok := strings.CutPrefix(err.Error(), "ASK ")
	if !ok {
		return "", false
	}
	_, addr, ok := strings.Cut(rest, " ")
	return addr, ok && addr != ""
}

// runOnWithWait sends the script and WAIT on one connection of node; with
// asking set, the script follows an ASKING (see runSynced).
func (c *Client) runOnWithWait(ctx context.Context, node *redis.Client, asking bool, s *redis.Script, keys []string, args []any) (*redis.Cmd, int64, error) {
	n, timeout := c.opts.replicas, c.opts.replicaTimeout
	ms := max(timeout.Milliseconds(), 1) // WAIT n 0 would block for good
	// go-redis stores "no read timeout" (ReadTimeout -1, or -2: no
	// deadline set at all) as 0 or -1: any WAIT fits then.
	if rt := node.Options().ReadTimeout; waitFits(timeout, rt) {
		// One round trip: EVALSHA and WAIT pipelined.
		send := func(sha bool, ms int64) (*redis.Cmd, *redis.Cmd) {
			pipe := node.Pipeline()
			if asking {
				pipe.Do(ctx, "ASKING")
			}
			var cmd *redis.Cmd
			if sha {
				cmd = s.EvalSha(ctx, pipe, keys, args...)
			} else {
				cmd = s.Eval(ctx, pipe, keys, args...)
			}
			wait := pipe.Do(ctx, "WAIT", n, ms)
			_, _ = pipe.Exec(ctx)
			return cmd, wait
		}
		start := time.Now()
		cmd, wait := send(true, ms)
		if isNoScript(cmd.Err()) {
			// The WAIT after the refused EVALSHA blocked too (for the
			// connection's earlier writes), up to the whole timeout when a
			// replica is slow: the WAIT after EVAL gets what is left of it,
			// so that the acquisition waits for its replicas no longer than
			// the timeout in all.
			left := max((timeout - time.Since(start)).Milliseconds(), 1)
			cmd, wait = send(false, left)
		}
		if cmd.Err() != nil {
			return cmd, 0, nil
		}
		acked, err := wait.Int64()
		return cmd, acked, err
	}
	// WAIT may outlast the read timeout of a pipeline: two round trips on a
	// pinned connection, WAIT with its own read timeout.
	ctx = unrouted(ctx)
	var cmd *redis.Cmd
	var acked int64
	var err error
	resendReadOnly(ctx, node.Options(), func() error {
		cmd, acked, err = runPinned(ctx, node, asking, s, keys, args, n, ms)
		return cmd.Err()
	})
	return cmd, acked, err
}

// resendReadOnly calls send, which sends commands on a new pinned
// connection and returns the error that says whether they ran, and calls it
// again while that error is READONLY: the connection reached a replica (a
// demoted master that a failover client still takes for the master).
// go-redis drops such a connection and sends a command again on another
// one, re-resolving the master, after a backoff, up to MaxRetries times;
// not on a pinned connection, whose retries all fail with "Conn is in a bad
// state". The commands did not run (a replica takes no write): they are
// sent again so, with go-redis's backoff, each time on a new pinned
// connection. It is shared by the acquisition's pinned script call (see
// runOnWithWait) and the watchdog's pinned renewal (see renewSyncedOn).
func resendReadOnly(ctx context.Context, o *redis.Options, send func() error) {
	for attempt := 0; ; attempt++ {
		if !redis.IsReadOnlyError(send()) || attempt >= o.MaxRetries {
			return
		}
		d := o.MinRetryBackoff << attempt
		if d < o.MinRetryBackoff || d > o.MaxRetryBackoff {
			d = o.MaxRetryBackoff
		}
		t := time.NewTimer(max(d, 0))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

// runPinned is the part of runOnWithWait that sends the script and WAIT
// one after the other on one pinned connection of node.
func runPinned(ctx context.Context, node *redis.Client, asking bool, s *redis.Script, keys []string, args []any, n int, ms int64) (*redis.Cmd, int64, error) {
	conn := node.Conn()
	defer conn.Close()
	run := func(sha bool) *redis.Cmd {
		var on redis.Scripter = conn
		var pipe redis.Pipeliner
		if asking {
			// ASKING and the script in one pipeline: go-redis sends a
			// command refused with TRYAGAIN again by itself (MaxRetries),
			// and the script sent again without its ASKING is answered
			// -MOVED by the importing node. A pipeline is not sent again
			// for a reply error, and when it is, ASKING goes with it.
			pipe = conn.Pipeline()
			pipe.Do(ctx, "ASKING")
			on = pipe
		}
		var cmd *redis.Cmd
		if sha {
			cmd = s.EvalSha(ctx, on, keys, args...)
		} else {
			cmd = s.Eval(ctx, on, keys, args...)
		}
		if pipe != nil {
			_, _ = pipe.Exec(ctx)
		}
		return cmd
	}
	cmd := run(true) // as s.Run does
	if isNoScript(cmd.Err()) {
		cmd = run(false)
	}
	if cmd.Err() != nil {
		return cmd, 0, nil
	}
	acked, err := conn.Wait(ctx, n, waitTimeout(ms)).Result()
	return cmd, acked, err
}

// replicated checks what runSynced reported for an acquisition that took
// something: with replica sync off, or enough replicas acknowledging, it
// returns nil. Else it releases what the acquisition took, with undo and a
// fresh bounded context (so that no hold remains that no replica has), and
// returns an error wrapping ErrNotReplicated that says how many replicas
// acknowledged, or why WAIT failed.
//
// It is the helper every primitive's acquisition uses:
//
//	cmd, acked, waitErr := c.runSynced(ctx, script, keys, args...)
//	// ... parse cmd; if the script took something:
//	if err := c.replicated(ctx, acked, waitErr, undo); err != nil { ... }
//
// The error is not a Redis reply error, and the acquire loop (see
// Client.failedAttempt) does not undo an ErrNotReplicated attempt again.
func (c *Client) replicated(ctx context.Context, acked int64, waitErr error, undo func(context.Context)) error {
	if c.opts.replicas <= 0 || (waitErr == nil && acked >= int64(c.opts.replicas)) {
		return nil
	}
	done := ""
	if undo != nil {
		cctx, cancel := cleanupContext(ctx)
		undo(cctx)
		cancel()
		done = ", released (or, if that release could not reach Redis, expiring within its lease)"
	}
	if waitErr != nil {
		return fmt.Errorf("%w: WAIT %d %v failed%s: %w", ErrNotReplicated,
			c.opts.replicas, c.opts.replicaTimeout, done, waitErr)
	}
	return fmt.Errorf("%w: %d of %d replicas acknowledged within %v%s", ErrNotReplicated,
		acked, c.opts.replicas, c.opts.replicaTimeout, done)
}

// isRedirect reports whether err is a cluster MOVED or ASK reply.
func isRedirect(err error) bool {
	if !isReplyError(err) {
		return false
	}
	code := replyCode(err)
	return code == "MOVED" || code == "ASK"
}

// runBatchesSynced is the watchdog's renewal under WithReplicaSync. The
// batches are grouped by the master of their slot; on each master one
// pinned connection sends that master's batches pipelined with one WAIT,
// which covers every write of the connection: one round trip per master
// and period, however many holds and slots (two when the WAIT timeout does
// not fit within the read timeout, see runOnWithWait). A batch whose renewal too few
// replicas acknowledged counts as a failed renewal for the holds it renewed:
// their results become -1 (not renewed, not lost), so their local deadlines
// are not extended. If replication does not recover before a deadline, the
// hold is lost (Lost closes) at the moment a replica promoted then could
// have let its copy of the lock expire. Holds the renewal found gone (0) are
// lost at once as usual.
func (w *watchdog) runBatchesSynced(ctx context.Context, batches [][]*hold) [][]int64 {
	return w.runBatchesSyncedNotify(ctx, batches, nil, nil)
}

// runBatchesSyncedNotify is runBatchesSynced that also calls done (when not
// nil) with the indices of each master's batches as soon as that master's
// results are in out (see runBatchesNotify).
func (w *watchdog) runBatchesSyncedNotify(ctx context.Context, batches [][]*hold, done func(which []int, out [][]int64), partDone func(batch int, at []int, res []int64)) [][]int64 {
	out := make([][]int64, len(batches))
	type group struct {
		node  *redis.Client
		batch []int
	}
	groups := make(map[string]*group)
	for i, b := range batches {
		node, err := w.c.masterFor(ctx, b[0].key)
		if err != nil {
			w.c.opts.logger.Warn("redlatch: renewal failed", "error", err)
			continue
		}
		g := groups[node.Options().Addr]
		if g == nil {
			g = &group{node: node}
			groups[node.Options().Addr] = g
		}
		g.batch = append(g.batch, i)
	}
	var wg sync.WaitGroup
	for _, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			split := w.renewSyncedOn(ctx, g.node, batches, g.batch, out)
			if len(split) == 0 {
				if done != nil {
					done(g.batch, out)
				}
				return
			}
			// The master's other batches are applied now: the key-by-key
			// renewals may wait for WAIT on another master (the importing
			// one), up to the replica timeout each, past their deadlines.
			if done != nil {
				rest := make([]int, 0, len(g.batch)-len(split))
				for _, i := range g.batch {
					if !slices.Contains(split, i) {
						rest = append(rest, i)
					}
				}
				done(rest, out)
			}
			w.renewSyncedKeyByKey(ctx, g.node, batches, split, out, partDone)
			if done != nil {
				done(split, out)
			}
		}()
	}
	wg.Wait()
	return out
}

// renewSyncedOn renews batches[i] for each i in which, on node, followed by
// one WAIT, and writes their results to out[i]. It returns the batches
// that node refused with TRYAGAIN (several holds, a slot migrating with
// keys of the batch on both sides) or ASK (every key moved), with out[i]
// left nil, for renewSyncedKeyByKey to send again one key at a time.
func (w *watchdog) renewSyncedOn(ctx context.Context, node *redis.Client, batches [][]*hold, which []int, out [][]int64) (split []int) {
	ms := max(w.c.opts.replicaTimeout.Milliseconds(), 1)
	// WAIT goes in the scripts' pipeline, one round trip, when it fits
	// within the connection's read timeout (see runOnWithWait): one
	// pipeline goes on one connection, no pinning needed, and it is routed
	// (see deadlineHook) like any other renewal. Else the scripts and WAIT
	// go on a pinned connection, unrouted (see unrouted).
	rt := node.Options().ReadTimeout
	piped := waitFits(w.c.opts.replicaTimeout, rt)
	type scripter interface {
		redis.Scripter
		Pipeline() redis.Pipeliner
		Wait(ctx context.Context, numSlaves int, timeout time.Duration) *redis.IntCmd
	}
	var cmds []*redis.Cmd
	var acked int64
	var waitErr error
	// renew sends the batches and WAIT on conn and returns the READONLY
	// of a script, if any (see resendReadOnly).
	renew := func(conn scripter) error {
		var wait *redis.Cmd
		send := func(ms int64) []*redis.Cmd {
			cmds := make([]*redis.Cmd, len(which))
			pipe := conn.Pipeline()
			for k, i := range which {
				keys, argv := renewArgs(batches[i])
				cmds[k] = renewScript.EvalSha(ctx, pipe, keys, argv...)
			}
			if piped {
				wait = pipe.Do(ctx, "WAIT", w.c.opts.replicas, ms)
			}
			_, _ = pipe.Exec(ctx)
			return cmds
		}
		start := time.Now()
		cmds = send(ms)
		for _, cmd := range cmds {
			if isNoScript(cmd.Err()) {
				if renewScript.Load(ctx, conn).Err() == nil {
					// A WAIT pipelined behind the refused scripts has waited
					// already: the next one gets what is left of the timeout
					// (see runOnWithWait).
					left := ms
					if piped {
						left = max((w.c.opts.replicaTimeout - time.Since(start)).Milliseconds(), 1)
					}
					cmds = send(left)
				}
				break
			}
		}
		if piped {
			acked, waitErr = wait.Int64()
		} else {
			acked, waitErr = conn.Wait(ctx, w.c.opts.replicas, waitTimeout(ms)).Result()
		}
		for _, cmd := range cmds {
			if redis.IsReadOnlyError(cmd.Err()) {
				return cmd.Err()
			}
		}
		return nil
	}
	if piped {
		renew(node)
	} else {
		ctx = unrouted(ctx)
		resendReadOnly(ctx, node.Options(), func() error {
			pc := node.Conn()
			defer pc.Close()
			return renew(pc)
		})
	}
	notSynced := w.c.replicated(ctx, acked, waitErr, nil)
	if notSynced != nil {
		w.c.opts.logger.Warn("redlatch: renewal not replicated", "node", node.Options().Addr, "error", notSynced)
	}
	for k, i := range which {
		res, err := cmds[k].Int64Slice()
		if err != nil {
			if isTryAgain(err) && len(batches[i]) > 1 || isReplyError(err) && replyCode(err) == "ASK" {
				// Keys of a migrating slot on both sides (TRYAGAIN), or
				// all of them moved (ASK): renewed key by key, each
				// following ASK as runSynced does.
				split = append(split, i)
				continue
			}
			if w.c.cluster != nil && (isRedirect(err) || !isReplyError(err)) {
				// The slot moved, or its master is gone (a failover may
				// have promoted a replica that has the hold): the next
				// period asks the new map.
				w.c.cluster.ReloadState(ctx)
			}
			w.c.opts.logger.Warn("redlatch: renewal failed", "error", err)
			continue
		}
		if notSynced != nil {
			for j := range res {
				if res[j] == 1 {
					res[j] = -1
				}
			}
		}
		out[i] = res
	}
	return split
}

// keyByKeyConcurrency bounds how many keys renewSyncedKeyByKey renews at
// once (each on a connection of its own, for its WAIT).
const keyByKeyConcurrency = 8

// renewSyncedKeyByKey is renewKeyByKey under WithReplicaSync: it renews
// batches[i] for each i in which one key at a time and writes their results
// to out[i]. Each key's script is followed by WAIT on the connection that
// ran it, by runSynced, as for an acquisition: a key that moved already
// (the source answers -ASK) is renewed on the importing master after
// ASKING, and WAIT counts that master's replicas. The keys go concurrently,
// up to keyByKeyConcurrency at a time, so that slow replicas do not make
// the WAITs add up. A key whose renewal fails counts as not renewed (-1),
// not as gone; one that too few replicas acknowledged too, as in a batch
// (see runBatchesSynced). Each key's results go to partDone (when not nil)
// as soon as they are in: the keys that moved wait for WAIT on the
// importing master, up to the replica timeout each, keyByKeyConcurrency at
// a time, and the holds the source master renewed must not wait for them,
// past their deadlines.
func (w *watchdog) renewSyncedKeyByKey(ctx context.Context, node *redis.Client, batches [][]*hold, which []int, out [][]int64, partDone func(batch int, at []int, res []int64)) {
	parts := splitByKey(batches, which)
	for _, i := range which {
		out[i] = make([]int64, len(batches[i]))
	}
	// First every key on node, the source master, one script call per key
	// and one WAIT, as renewSyncedOn sends batches: the keys it still
	// has are renewed at once, whatever the importing master's replicas
	// take. Only the others (-ASK: moved) go one by one through runSynced.
	sub := make([][]*hold, len(parts))
	all := make([]int, len(parts))
	for k, p := range parts {
		sub[k] = make([]*hold, len(p.at))
		for n, j := range p.at {
			sub[k][n] = batches[p.batch][j]
		}
		all[k] = k
	}
	first := make([][]int64, len(parts))
	w.renewSyncedOn(ctx, node, sub, all, first)
	var rest []*keyPart
	for k, p := range parts {
		if first[k] == nil {
			rest = append(rest, p)
			continue
		}
		p.set(out, first[k])
		if partDone != nil {
			partDone(p.batch, p.at, first[k])
		}
	}
	slots := make(chan struct{}, keyByKeyConcurrency)
	var wg sync.WaitGroup
	for _, p := range rest {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() {
				<-slots
				wg.Done()
			}()
			var res []int64
			defer func() {
				p.set(out, res)
				if partDone != nil {
					partDone(p.batch, p.at, res)
				}
			}()
			keys, argv := p.args(batches)
			cmd, acked, waitErr := w.c.runSynced(ctx, renewScript, keys, argv...)
			res, err := cmd.Int64Slice()
			if err != nil || len(res) != len(p.at) {
				w.c.opts.logger.Warn("redlatch: renewal failed", "key", keys[0], "error", err)
				res = nil
				return
			}
			if notSynced := w.c.replicated(ctx, acked, waitErr, nil); notSynced != nil {
				w.c.opts.logger.Warn("redlatch: renewal not replicated", "key", keys[0], "error", notSynced)
				for j := range res {
					if res[j] == 1 {
						res[j] = -1
					}
				}
			}
		}()
	}
	wg.Wait()
}
