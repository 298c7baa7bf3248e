package redlatch

import (
	"context"
	"errors"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Wake-up messages published on a primitive's channel.
const (
	wakeOne = "1" // wake one local waiter per Client (a lock was released)
	wakeAll = "a" // wake every local waiter (a latch opened, a writer left)

	// wakeWaiterPrefix + a waiter id wakes that one waiter only (joined
	// with joinID): FairMutex's handoff to the queue head. The id may be
	// followed by ":" and a grant (the handed-off hold's fencing token),
	// which the waiter takes with takeGrant.
	wakeWaiterPrefix = "w:"
)

// The subscriber pings the server when it has read nothing for a health
// interval: a third of the watchdog timeout, but at least min and at most
// max. The floor keeps a slow but live link (hundreds of ms of latency) from
// being taken for a dead one.
const (
	minHealthInterval = time.Second
	maxHealthInterval = 5 * time.Second
)

// healthInterval returns how long the subscriber waits for a message before
// it pings, and then for the reply before it gives the connection up.
func (p *pubsub) healthInterval() time.Duration {
	return min(maxHealthInterval, max(minHealthInterval, p.c.opts.watchdogTimeout/3))
}

// pubsub multiplexes the wake-ups of every waiter of a Client over one
// subscriber connection per Redis node (one in all, except on a Redis ≥ 7
// Cluster, where sharded pub/sub needs one per master).
//
// A channel is subscribed while at least one local waiter waits on it and
// unsubscribed when the last one leaves. A waiter joins before its retry, so
// a release landing between its failed attempt and its sleep still wakes it,
// and each sleep is bounded by the lock's remaining lease, so a crashed holder
// or a lost message delays a waiter by at most that lease. When the
// connection drops, go-redis reconnects and subscribes again; the
// confirmation of each re-subscription wakes every waiter of that channel to
// retry, so a message lost in the gap delays no one past the reconnection.
//
// On a cluster, a master that gives a slot away (resharding) drops the
// sharded subscriptions of its channels itself; the channel is then
// subscribed on the slot's new master and its waiters retry. A master that
// dies says nothing: while its subscriber connection is down, the slot map
// is reloaded, and a channel whose slot a replica took over (a failover)
// moves there the same way. A subscriber connection that stays silent for
// two health intervals (a half-open connection) is dropped and dialled
// again.
//
// Worst case for a waiter, then: woken at once by a message; else at the
// re-subscription after a dropped connection or a moved slot; else when the
// holder's lease runs out (at most the watchdog timeout, or the WithLease
// lease).
type pubsub struct {
	c  *Client
	id string // unique (newID): names per-Client channels (FairMutex)
	// ctx is the Client's, marked as this plain subscriber connection's
	// (see failoverHook): go-redis dials that connection with it.
	ctx context.Context
	// subAddr is the server the plain subscriber connection was last
	// dialled to, on a sentinel failover client (nil or "" when unknown,
	// or dropped since: see failoverHook).
	subAddr atomic.Pointer[string]
	unwatch func() // ends watchFailover; nil when not watching

	yieldDelay time.Duration // see armYield

	mu      sync.Mutex
	nodes   map[string]*psNode // by master address; "" when not sharded
	chans   map[string]*psChan // subscribed channels, by name
	closed  bool
	closing chan struct{} // closed by close: waits end with ErrClosed
	wg      sync.WaitGroup
	// streaks counts the local transfers in a row of the lock of a
	// channel (see reserveLocal), from the first until the lock leaves this
	// Client's chain of holds: a public release, or a hold found gone or
	// lost (endStreak). Not on psChan: the channel is dropped whenever its
	// only waiter takes the lock, and subscribed again by the next one.
	streaks map[string]int
}

// psNode is one subscriber connection.
type psNode struct {
	ps      *redis.PubSub
	sharded bool
	addr    string // the master's address; "" when not sharded
	// broken is set while the connection is down (from its first failure
	// until it delivers again); following, guarded by pubsub.mu, while a
	// follow goroutine checks where its channels' slots went.
	broken    atomic.Bool
	following bool
	// resubscribed is set whenever go-redis may have dialled a new
	// connection and re-subscribed its whole set in one command (a failed
	// read, or a failed write of ours), and cleared only by the NOPERM
	// that may answer it (see receive). Not broken: a message the reader
	// had already read from the old connection clears that one, and a
	// re-subscription that succeeded leaves at most one needless round of
	// single re-subscriptions behind.
	resubscribed atomic.Bool
	stop         chan struct{} // closed when the node is retired (see follow)
	// inflight counts the (un)subscribe commands per channel whose
	// confirmation has not arrived: only the confirmation of the latest one
	// says what the channel's state is.
	inflight map[string]int
	// pending holds the (un)subscribe commands not yet written, oldest
	// first; the node's writer goroutine writes them, outside pubsub.mu,
	// so that a slow or unreachable server (a dial) holds up no one else.
	pending []psCommand
	kick    chan struct{} // capacity 1: pending is not empty
}

// psCommand is a (un)subscribe command of a channel.
type psCommand struct {
	channel   string
	subscribe bool
	forget    bool // no confirmation expected (the node gave the slot away)
}

// psChan is a subscribed channel and its local waiters, oldest first.
type psChan struct {
	// yields holds the request ids of this Client's releases whose
	// wake-ups its waiters sit out (see armYield), each mapped to whether
	// its wake-up came; nil when none was armed yet.
	yields  map[string]bool
	name    string
	node    *psNode
	waiters []*waiter
	ready   chan struct{} // closed at the first confirmation
	isReady bool
}

// waiter is one blocked call waiting for wake-ups on one channel.
type waiter struct {
	p   *pubsub
	ch  *psChan
	sig chan struct{} // capacity 1: a pending wake-up
	id  string        // "" or the id that wakeWaiterPrefix messages name
	// grant is the grant of the latest wakeWaiterPrefix message naming the
	// waiter, "" when none; guarded by pubsub.mu.
	grant string

	// A local transfer (see excl.unlock), all guarded by pubsub.mu: xfer
	// says whom to transfer to (nil: this waiter takes none); reserved, that
	// an Unlock is handing the lock to it; grantSent, when that Unlock sent
	// its script (the transferred lease runs from no earlier); left and
	// acquired, that the waiter is gone, and whether with the lock.
	xfer      *transfer
	reserved  bool
	grantSent time.Time
	left      bool
	acquired  bool
	// unsure: an Unlock that had reserved the waiter lost its reply, so
	// a transfer may have happened unannounced; the waiter gives back what
	// it may have been handed if it leaves without the lock (see unsure).
	unsure bool
	// took is the token of the hold the waiter acquired (acquired set), 0
	// when unknown: a transfer naming another token came after the waiter
	// had taken the lock with an attempt of its own (a re-entry of the hold
	// the transfer ends), and no one holds it.
	took int64
	// delivery reports that the waiter's latest wake-up, pending if one is,
	// came from deliver: it concerns this waiter alone, announcing no
	// release to the others (see leave).
	delivery bool
	// unconfirmed: the waiter stopped waiting for its channel's first
	// confirmation (join's bound); guarded by pubsub.mu.
	unconfirmed bool
	// kin is the owner id whose holds the waiter re-enters (see kinship),
	// or ""; guarded by pubsub.mu.
	kin string
	// turns: the waiter waits in Client.acquire, which passes a wake-up it
	// does not use on when it leaves (see leave), so that a waiter may queue
	// behind it without an attempt; guarded by pubsub.mu. A Redlock's
	// waiter keeps its wake-ups while it waits on.
	turns bool
}

// kinship names the waiters of one owner on a Client, which re-enter each
// other's holds: the goroutines of a reentrant handle, and the handles of
// this Client sharing its owner id. When one of them takes the lock, the
// handle wakes the others (wakeKin): they would otherwise sleep until the
// previous holder's lease bound while their own owner holds the lock. On an
// RWMutex, the owner's readers enter with its write hold as well as with
// its read hold (a writer's owner may read), so both wake them. held
// reports whether the handle holds the lock now: a waiter that queued
// without an attempt (see Client.acquire) checks it after queueing, so a
// wake-up sent just before cannot be missed (the handle records its hold
// before it wakes the kin).
type kinship struct {
	owner string
	held  func() bool
}

// transfer describes a waiting acquisition an Unlock of the same Client may
// hand the lock to.
type transfer struct {
	owner string
	req   string // the acquisition's request id
	lease time.Duration
	// take records a transferred hold as the acquisition's result.
	take func(token int64, sent time.Time)
	// token returns the token of the hold the acquisition took, once it
	// succeeded (read by the acquiring goroutine only).
	token func() int64
	// giveBack releases the transferred hold with that token, and no other
	// hold the acquisition took (nil: undo the acquisition).
	giveBack func(ctx context.Context, token int64)
	// giveBackUnless releases a hold transferred to the acquisition by an
	// Unlock whose reply was lost, if it happened: the owner's current hold
	// when its token is not took, the token of the hold the acquisition
	// took with an attempt of its own (nil: none). The failed Unlock runs it
	// when the waiter has left already (see excl.unlockDone), the waiter's
	// cleanup when it leaves after.
	giveBackUnless func(ctx context.Context, took int64)
}

// maxLocalTransfers is how many times in a row the lock of a channel passes
// from a waiter of this Client to the next without a public release; then
// a release lets the waiters of every Client compete.
const maxLocalTransfers = 8

// reserveLocal reports whether a call of this Client waits on channel (a
// release must then publish a wake-up even when Redis saw no failed attempt
// during the hold: a waiter may queue without an attempt of its own). With
// transfer set, it also picks the oldest waiter that takes transfers and is
// not already reserved, and reserves it; nil when there is none, when the
// channel's turn of local transfers is over, or when that waiter's lease is
// shorter than lease, the lease of the hold released (the lock is then
// released publicly): waiters of other Clients sleep on the released hold's
// remaining lease and hear nothing of a transfer, so a shorter hold that
// ran out unreleased would leave the lock free while they sleep on.
func (p *pubsub) reserveLocal(channel string, transfer bool, lease time.Duration) (w *waiter, waiting bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ch := p.chans[channel]
	if ch == nil || len(ch.waiters) == 0 {
		return nil, false
	}
	if !transfer {
		return nil, true
	}
	if p.streaks[channel] >= maxLocalTransfers {
		delete(p.streaks, channel)
		return nil, true
	}
	for _, w := range ch.waiters {
		if w.xfer != nil && !w.reserved && !w.left && w.grant == "" {
			if w.xfer.lease < lease {
				break
			}
			w.reserved = true
			p.streaks[channel]++
			return w, true
		}
	}
	delete(p.streaks, channel)
	return nil, true
}

// endStreak ends the run of local transfers of the lock of channel: the
// lock was released publicly, or its hold was found gone (or the outcome of
// its release is unknown).
func (p *pubsub) endStreak(channel string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.streaks, channel)
}

// deliver hands a transferred hold to its reserved waiter and wakes it. It
// returns false when the waiter left without the lock meanwhile: the caller
// must then release the transferred hold.
func (p *pubsub) deliver(w *waiter, token int64, sent time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	w.reserved = false
	if w.left {
		// It took the hold with an attempt of its own: this one, or (a
		// re-entry of the hold the transfer ended) another.
		return w.acquired && (w.took == 0 || w.took == token)
	}
	w.grant, w.grantSent = strconv.FormatInt(token, 10), sent
	select {
	case w.sig <- struct{}{}:
		w.delivery = true
	default:
	}
	return true
}

// yieldDelay is how long a Client's waiters hold back after a public
// release of their own Client that other Clients heard (see armYield); the
// default of pubsub.yieldDelay, which tests raise.
const yieldDelay = 2 * time.Millisecond

// armYield is called before a public release of the lock of channel, with
// the release's request id req, which unlock.lua publishes as its wake-up:
// this Client's waiters sit out the wake-up of their own Client's release,
// so that the other Clients' waiters, which hear it too, take the lock
// after this Client's run of local transfers. The wake-up is recognised by
// its payload, not by its order: it may reach the subscriber connection
// before or after the release's reply. endYield must follow.
func (p *pubsub) armYield(channel, req string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ch := p.chans[channel]; ch != nil {
		if ch.yields == nil {
			ch.yields = make(map[string]bool)
		}
		ch.yields[req] = false
	}
}

// endYield ends the release armYield announced. With heard set, the release
// happened and other Clients heard its wake-up: if none of them has taken
// the lock after yieldDelay, one local waiter is woken anyway, so a yield
// costs at most that delay. The fallback fires even when a waiter of this
// Client has taken the lock since: its attempt, failing, sets the hold's w
// field, so that a release of that hold by another Client (a handle
// sharing the owner id) publishes too. Otherwise no other Client waits
// (or nothing was released): the local waiters get the wake-up at once;
// with unheard set, the release happened but its wake-up reached no
// subscriber, not even this Client's (its publish was refused, or went to
// plain pub/sub while the channel is sharded): no message will come, so one
// local waiter is woken here. A waiter queued without an attempt of its own
// has no remaining lease to bound its sleep.
func (p *pubsub) endYield(channel, req string, heard, unheard bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ch := p.chans[channel]
	if ch == nil {
		return
	}
	seen, armed := ch.yields[req]
	if !armed {
		return // the channel was dropped and subscribed again meanwhile
	}
	if !heard {
		delete(ch.yields, req)
		if seen || unheard {
			signalOne(ch.waiters)
		}
		return
	}
	time.AfterFunc(p.yieldDelay, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(ch.yields, req)
		signalOne(ch.waiters)
	})
}

// unreserve ends a reservation that brought no transfer; with retry, the
// waiter is woken to make an attempt at once.
func (p *pubsub) unreserve(w *waiter, retry bool) {
	if w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	w.reserved = false
	if retry && !w.left {
		select {
		case w.sig <- struct{}{}:
			w.delivery = false
		default:
		}
	}
}

// unsure ends a reservation whose Unlock failed without a reply: the
// transfer may have happened. A waiter still waiting is woken to retry (its
// attempt recognises a transferred hold as its own) and, should it leave
// without the lock, undoes its acquisition (see Client.acquire). It
// reports whether the waiter has left already: the caller must then give
// back what may have been transferred to it, and no other hold; acquired
// and took say whether it left with a hold, and that hold's token (0: not
// known), which it may have taken with an attempt of its own (a re-entry of
// the hold the transfer ended, or a hold taken after the transferred one
// was force-unlocked).
func (p *pubsub) unsure(w *waiter) (left, acquired bool, took int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	w.reserved = false
	if w.left {
		return true, w.acquired, w.took
	}
	w.unsure = true
	select {
	case w.sig <- struct{}{}:
		w.delivery = false
	default:
	}
	return false, false, 0
}

// setTransfer makes w a waiter of Client.acquire (see waiter.turns) that
// takes transfers described by x (nil: none).
func (p *pubsub) setTransfer(w *waiter, x *transfer, kin *kinship) {
	p.mu.Lock()
	w.turns = true
	w.xfer = x
	if kin != nil {
		w.kin = kin.owner
	}
	p.mu.Unlock()
}

// setKin marks w, when not nil, as a waiter that re-enters owner's holds
// (see kinship); a FairMutex waiter, which takes no transfers.
func (p *pubsub) setKin(w *waiter, owner string) {
	if w == nil {
		return
	}
	p.mu.Lock()
	w.kin = owner
	p.mu.Unlock()
}

// wakeKin wakes the waiters on channel that re-enter owner's holds (see
// kinship): owner has just taken or re-entered the lock.
func (p *pubsub) wakeKin(channel, owner string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ch := p.chans[channel]; ch != nil {
		for _, w := range ch.waiters {
			if w.kin == owner {
				signalAll([]*waiter{w})
			}
		}
	}
}

// wakeOne wakes one local waiter on channel, as a wake-up message would: a
// hold of this Client on that lock was lost (its lease ran out, or a
// renewal found it gone). No release announced it, and a waiter queued
// behind that hold without an attempt of its own (see Client.acquire) has
// no remaining lease to bound its sleep: the one woken tries at once.
func (p *pubsub) wakeOne(channel string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.streaks, channel) // the hold is gone: so is its run of transfers
	if ch := p.chans[channel]; ch != nil {
		signalOne(ch.waiters)
	}
}

// takeTransfer returns and clears the transferred hold delivered to w: its
// token, or 0 when none.
func (w *waiter) takeTransfer() (int64, time.Time) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	if w.xfer == nil || w.grant == "" {
		return 0, time.Time{}
	}
	t, _ := strconv.ParseInt(w.grant, 10, 64)
	w.grant = ""
	return t, w.grantSent
}

// takeGrant returns and clears the grant a wake-up message brought the
// waiter, or "" when none did.
func (w *waiter) takeGrant() string {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	g := w.grant
	w.grant = ""
	return g
}

func newPubsub(c *Client) *pubsub {
	p := &pubsub{
		c:          c,
		id:         newID(),
		yieldDelay: yieldDelay,
		nodes:      make(map[string]*psNode),
		chans:      make(map[string]*psChan),
		streaks:    make(map[string]int),
		closing:    make(chan struct{}),
	}
	p.ctx = context.WithValue(c.ctx, subscriberDial{}, p)
	return p
}

// join registers a waiter on channel, subscribing it if this is its first
// local waiter, and waits until the subscription is confirmed, or for at most
// bound (the lock's remaining lease: the waiter will retry then anyway).
func (p *pubsub) join(ctx context.Context, channel string, bound time.Duration) (*waiter, error) {
	return p.joinID(ctx, channel, "", bound)
}

// joinID is join for a waiter that wakeWaiterPrefix+id messages name.
func (p *pubsub) joinID(ctx context.Context, channel, id string, bound time.Duration) (*waiter, error) {
	pub, closed := p.c.waitPublishCommand(ctx)
	if closed {
		return nil, ErrClosed
	}
	if ctx.Err() != nil {
		// The check of the masters' versions (a cluster) outlasted ctx: no
		// subscription on a connection picked without it.
		return nil, newWaitError(ctx, nil)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	ch := p.chans[channel]
	if ch == nil {
		// sharded: a probe that succeeded meanwhile moves the plain
		// channels under p.mu after setting it (see reshard).
		node, err := p.nodeLocked(ctx, channel, pub == "SPUBLISH" || p.c.sharded.Load())
		if err != nil {
			p.mu.Unlock()
			return nil, err
		}
		ch = &psChan{name: channel, node: node, ready: make(chan struct{})}
		p.chans[channel] = ch
		node.send(channel, true)
	}
	w := &waiter{p: p, ch: ch, sig: make(chan struct{}, 1), id: id}
	ch.waiters = append(ch.waiters, w)
	ready := ch.ready
	p.mu.Unlock()

	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-ready:
		return w, nil
	case <-t.C:
		// The waiter retries before its channel is subscribed: a release
		// published until then is missed, so the confirmation wakes it.
		p.mu.Lock()
		w.unconfirmed = !ch.isReady
		p.mu.Unlock()
		return w, nil
	case <-ctx.Done():
		w.leave(true)
		return nil, newWaitError(ctx, nil)
	case <-p.closing:
		w.leave(false)
		return nil, ErrClosed
	}
}

// joinQueued registers a waiter on channel, without a round trip, when the
// channel is subscribed and already has local waiters; else it returns nil.
// The caller still makes its attempt (a release after that attempt then
// wakes it too).
func (p *pubsub) joinQueued(channel string) *waiter {
	return p.joinQueuedID(channel, "")
}

// joinQueuedBehind is joinQueued for a waiter that sleeps before any attempt
// of its own: it needs a waiter of Client.acquire on the channel (see
// waiter.turns). A release wakes one of those waiters, and each passes the
// turn on, so the new waiter needs no attempt before its first sleep.
// Behind a Redlock's waiter alone, which keeps its wake-ups while it waits
// on, it would sleep its whole bound on a free lock.
func (p *pubsub) joinQueuedBehind(channel string) *waiter {
	return p.joinWaiting(channel, "", true)
}

// joinQueuedID is joinQueued for a waiter that wakeWaiterPrefix+id messages
// name.
func (p *pubsub) joinQueuedID(channel, id string) *waiter {
	return p.joinWaiting(channel, id, false)
}

// joinWaiting is joinQueuedID; with behind set it also needs a
// waiter of Client.acquire on the channel (see joinQueuedBehind). It takes
// pubsub.mu.
func (p *pubsub) joinWaiting(channel, id string, behind bool) *waiter {
	p.mu.Lock()
	defer p.mu.Unlock()
	ch := p.chans[channel]
	if p.closed || ch == nil || !ch.isReady || len(ch.waiters) == 0 {
		return nil
	}
	if behind && !slices.ContainsFunc(ch.waiters, func(w *waiter) bool { return w.turns }) {
		return nil
	}
	w := &waiter{p: p, ch: ch, sig: make(chan struct{}, 1), id: id}
	ch.waiters = append(ch.waiters, w)
	return w
}

// nodeLocked returns the subscriber connection for channel, creating it
// (and its receive goroutine) on first use.
func (p *pubsub) nodeLocked(ctx context.Context, channel string, sharded bool) (*psNode, error) {
	if sharded {
		master, err := p.c.cluster.MasterForKey(ctx, channel)
		if err != nil {
			return nil, err
		}
		return p.shardNodeLocked(master), nil
	}
	if n := p.nodes[""]; n != nil {
		return n, nil
	}
	if r, ok := p.c.rdb.(*redis.Client); ok {
		return p.newNodeLocked("", writeDeadlines(r).Subscribe(p.ctx), false), nil
	}
	return p.newNodeLocked("", p.c.rdb.Subscribe(p.ctx), false), nil
}

// writeDeadlines returns r, or, when r sets no write deadlines at all
// (WriteTimeout -2, or ReadTimeout -2 with WriteTimeout unset), a clone of
// r for the plain subscriber connection that sets them, with no timeout of
// its own (WriteTimeout -1): when a failover client's commands reach a new
// master, dropConnection drops the subscriber connection to the old one by
// a ping written under a past deadline, which r would never set, and the
// connection would stay on the old master (see failoverHook). The clone
// shares r's pools and dial hooks. (The receive goroutine drops its
// connection by a read instead, which needs no write deadline.)
func writeDeadlines(r *redis.Client) *redis.Client {
	o := r.Options()
	if o.WriteTimeout >= 0 {
		return r
	}
	clone := r.WithTimeout(o.ReadTimeout)
	clone.Options().WriteTimeout = 0 // go-redis's own value for -1
	return clone
}

// shardNodeLocked returns the sharded subscriber connection of a master,
// creating it on first use.
func (p *pubsub) shardNodeLocked(master *redis.Client) *psNode {
	addr := master.Options().Addr
	if n := p.nodes[addr]; n != nil {
		return n
	}
	return p.newNodeLocked(addr, master.SSubscribe(p.c.ctx), true)
}

// newNodeLocked registers a subscriber connection and starts its goroutines.
func (p *pubsub) newNodeLocked(addr string, ps *redis.PubSub, sharded bool) *psNode {
	n := &psNode{ps: ps, sharded: sharded, addr: addr, inflight: make(map[string]int),
		kick: make(chan struct{}, 1), stop: make(chan struct{})}
	p.nodes[addr] = n
	p.wg.Add(2)
	go p.receive(n)
	go p.write(n)
	return n
}

// reshard moves every channel subscribed with plain pub/sub to the sharded
// subscriber connection of its slot's master, and wakes its waiters (a
// release was published with SPUBLISH meanwhile): called once, when the
// Client's check of the masters' versions first succeeds after a failed one
// made its waiters subscribe with plain pub/sub.
func (p *pubsub) reshard(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	for name, ch := range p.chans {
		if ch.node.sharded {
			continue
		}
		master, err := p.c.cluster.MasterForKey(ctx, name)
		if err != nil {
			continue
		}
		ch.node.send(name, false)
		ch.node = p.shardNodeLocked(master)
		ch.node.send(name, true)
		signalAll(ch.waiters)
	}
}

// rehome moves a sharded channel whose slot left node from to the master
// that owns the slot now, once the cluster's slot map says which that is,
// and wakes its waiters: a release published in between went to the new
// master. It gives up after a few seconds (the waiters then fall back to
// their lease bound, as on any lost message).
func (p *pubsub) rehome(ch *psChan, from *psNode) {
	defer p.wg.Done()
	ctx := p.c.ctx
	for attempt := 1; attempt <= 20; attempt++ {
		p.c.cluster.ReloadState(ctx) // starts a reload in the background
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(attempt) * 25 * time.Millisecond):
		}
		master, err := p.c.cluster.MasterForKey(ctx, ch.name)
		if err != nil {
			continue
		}
		p.mu.Lock()
		if p.closed || p.chans[ch.name] != ch || ch.node != from {
			p.mu.Unlock()
			return // the channel was left or moved meanwhile
		}
		if p.nodes[master.Options().Addr] == from {
			p.mu.Unlock()
			continue // the slot map is not reloaded yet
		}
		from.forget(ch.name)
		ch.node = p.shardNodeLocked(master)
		ch.node.send(ch.name, true)
		signalAll(ch.waiters)
		p.mu.Unlock()
		p.c.opts.logger.Debug("redlatch: subscription followed its slot", "channel", ch.name,
			"master", master.Options().Addr)
		return
	}
	p.c.opts.logger.Warn("redlatch: subscription's slot moved, new master unknown", "channel", ch.name)
}

// refused handles a CROSSSLOT reply on sharded node n (see below), and a
// MOVED reply there: an SSUBSCRIBE sent
// there with a stale slot map (the slot had moved already, so no
// SUNSUBSCRIBE of the server's will follow). No confirmation comes for it:
// the channels of n in that slot with a command in flight follow the slot
// to its new master, as after a migration (see rehome).
//
// It reports whether it handled err: false for any other refusal.
func (p *pubsub) refused(n *psNode, err error) bool {
	if strings.HasPrefix(err.Error(), "CROSSSLOT") {
		// go-redis re-subscribes every sharded channel of a connection in
		// one SSUBSCRIBE after a reconnection, which a cluster refuses when
		// they span slots (nothing else sends more than one channel):
		// subscribe each channel again, and the confirmations wake the
		// waiters.
		p.mu.Lock()
		defer p.mu.Unlock()
		for name, ch := range p.chans {
			if ch.node == n && !p.closed {
				n.send(name, true)
			}
		}
		return true
	}
	rest, ok := strings.CutPrefix(err.Error(), "MOVED ")
	if !ok {
		return false
	}
	s, _, _ := strings.Cut(rest, " ")
	slot, perr := strconv.Atoi(s)
	if perr != nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return true
	}
	for name := range n.inflight {
		if ch := p.chans[name]; keySlot(name) != slot || ch != nil && ch.node == n {
			continue // handled below
		}
		// A channel left since (its waiters gone, or moved away): the
		// SUNSUBSCRIBE of its last waiter went here after the slot had
		// moved. No confirmation comes for it; left owed, it would take
		// the confirmation of a later SSUBSCRIBE of the channel here (the
		// slot came back) for its own, and that channel's waiters would
		// wait for one that never comes.
		if n.inflight[name]--; n.inflight[name] <= 0 {
			delete(n.inflight, name)
		}
	}
	for name, ch := range p.chans {
		if ch.node != n || keySlot(name) != slot {
			continue
		}
		// Also a channel owing no confirmation: the -MOVED may answer
		// go-redis's re-subscription of it after a reconnection (the slot
		// moved while the connection was down, so the old master's own
		// SUNSUBSCRIBE never came). n does not serve the slot either way.
		if n.inflight[name] > 0 {
			if n.inflight[name]--; n.inflight[name] == 0 {
				delete(n.inflight, name)
			}
		}
		p.wg.Add(1)
		go p.rehome(ch, n)
	}
	return true
}

// follow runs while sharded node n's connection is down. Its master may be
// dead, and a replica may have taken its slots over (a failover): no message
// of the old master says so, unlike a slot migration (see rehome). follow
// reloads the cluster's slot map until the connection is back, moving every
// channel of n whose slot another master serves now there, and waking its
// waiters (a release may have been published there meanwhile). A node left
// without channels while its connection is down is retired: its goroutines
// end and it is closed.
func (p *pubsub) follow(n *psNode) {
	defer p.wg.Done()
	ctx := p.c.ctx
	delay := 100 * time.Millisecond
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
		p.c.cluster.ReloadState(ctx) // in the background: seen by a later round
		p.mu.Lock()
		var names []string
		for name, ch := range p.chans {
			if ch.node == n {
				names = append(names, name)
			}
		}
		p.mu.Unlock()
		for _, name := range names {
			master, err := p.c.cluster.MasterForKey(ctx, name)
			if err != nil || master.Options().Addr == n.addr {
				continue
			}
			p.mu.Lock()
			if ch := p.chans[name]; ch != nil && ch.node == n && !p.closed {
				n.forget(name)
				ch.node = p.shardNodeLocked(master)
				ch.node.send(name, true)
				signalAll(ch.waiters)
				p.c.opts.logger.Debug("redlatch: subscription followed its slot after its master failed",
					"channel", name, "master", master.Options().Addr)
			}
			p.mu.Unlock()
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return
		}
		left := false
		for _, ch := range p.chans {
			if ch.node == n {
				left = true
				break
			}
		}
		broken := n.broken.Load()
		if broken && left {
			p.mu.Unlock()
			continue
		}
		n.following = false
		retire := broken && !left && p.nodes[n.addr] == n
		if retire {
			delete(p.nodes, n.addr)
			close(n.stop)
		}
		p.mu.Unlock()
		if retire {
			_ = n.ps.Close()
			p.c.opts.logger.Debug("redlatch: subscriber connection of a failed master retired", "master", n.addr)
		}
		return
	}
}

// resubscribePause is how long a node's writer waits before it subscribes
// a channel again after a failed subscribe; it doubles, up to a second,
// while the subscribes keep failing.
const resubscribePause = 100 * time.Millisecond

// send queues a (un)subscribe command for channel; called with pubsub.mu
// held. The node's writer goroutine writes the commands in order.
func (n *psNode) send(channel string, subscribe bool) {
	n.inflight[channel]++
	n.queue(psCommand{channel: channel, subscribe: subscribe})
}

// forget queues the unsubscribe of a channel the node's server dropped
// itself (its slot moved): it only removes the channel from go-redis's set,
// which would otherwise subscribe it there again at the next reconnection.
// The server answers it with an error (MOVED), not a confirmation.
func (n *psNode) forget(channel string) {
	n.queue(psCommand{channel: channel, forget: true})
}

func (n *psNode) queue(cmd psCommand) {
	n.pending = append(n.pending, cmd)
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// write writes node n's queued (un)subscribe commands, in order, until the
// Client closes. Errors are not returned: go-redis keeps the channel set and
// subscribes it again when it reconnects, and waiters are bounded by the
// lease meanwhile.
func (p *pubsub) write(n *psNode) {
	defer p.wg.Done()
	ctx := p.ctx
	var resend []string // channels whose subscribe failed
	pause := resubscribePause
	for {
		select {
		case <-n.kick:
		case <-ctx.Done():
			return
		case <-p.closing:
			return
		case <-n.stop:
			return
		}
		p.mu.Lock()
		cmds := n.pending
		n.pending = nil
		p.mu.Unlock()
		for _, cmd := range cmds {
			var err error
			switch {
			case cmd.subscribe && n.sharded:
				err = n.ps.SSubscribe(ctx, cmd.channel)
			case cmd.subscribe:
				err = n.ps.Subscribe(ctx, cmd.channel)
			case n.sharded:
				err = n.ps.SUnsubscribe(ctx, cmd.channel)
			default:
				err = n.ps.Unsubscribe(ctx, cmd.channel)
			}
			if err != nil && !cmd.forget {
				// The write failed: go-redis closed the connection inside
				// the call (and may have dialled a new one, re-subscribing
				// its set), or had none. No confirmation comes for this
				// command, nor for any other the old connection owed,
				// and the reader may never see that connection fail (it
				// may be between reads, and read the new one next): forget
				// them all, as the reader does when its read fails. A
				// NOPERM answering go-redis's re-subscription on the new
				// connection must be known for one (see receive).
				n.resubscribed.Store(true)
				p.mu.Lock()
				clear(n.inflight)
				if ch := p.chans[cmd.channel]; cmd.subscribe && ch != nil && ch.node == n {
					// go-redis may have reconnected inside the failed call,
					// before it added the channel to the set it subscribes
					// on a new connection: subscribe it again, after a
					// pause (the server may be down).
					resend = append(resend, cmd.channel)
				}
				p.mu.Unlock()
			}
		}
		if len(resend) == 0 {
			pause = resubscribePause
		} else {
			select {
			case <-ctx.Done():
				return
			case <-n.stop:
				return
			case <-time.After(pause):
			}
			pause = min(2*pause, time.Second)
			p.mu.Lock()
			for _, name := range resend {
				if ch := p.chans[name]; ch != nil && ch.node == n && !p.closed {
					n.send(name, true)
				}
			}
			p.mu.Unlock()
			resend = resend[:0]
		}
	}
}

// wait sleeps until a wake-up, or bound, or the end of ctx or the Client.
// It reports whether a wake-up message ended the sleep.
func (w *waiter) wait(ctx context.Context, bound time.Duration) (bool, error) {
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-w.sig:
		return true, nil
	case <-t.C:
		return false, nil
	case <-ctx.Done():
		return false, newWaitError(ctx, nil)
	case <-w.p.closing:
		return false, ErrClosed
	}
}

// leave unregisters the waiter. A waiter leaving without the lock (passOn),
// or with a wake-up it did not use, wakes the next local waiter, so a waiter
// giving up can neither swallow a wake-up nor strand a waiter queued behind
// it; not for an unused delivery (a transfer to this waiter, which it took
// with an attempt of its own), which announces nothing to the others. The
// last waiter unsubscribes the channel.
func (w *waiter) leave(passOn bool) {
	p := w.p
	p.mu.Lock()
	defer p.mu.Unlock()
	w.left = true
	ch := w.ch
	for i, o := range ch.waiters {
		if o == w {
			ch.waiters = append(ch.waiters[:i], ch.waiters[i+1:]...)
			break
		}
	}
	select {
	case <-w.sig:
		// A named waiter's (FairMutex) wake-ups concern it alone.
		passOn = passOn || (!w.delivery && w.id == "")
	default:
	}
	if passOn {
		signalOne(ch.waiters)
	}
	if len(ch.waiters) == 0 && p.chans[ch.name] == ch {
		delete(p.chans, ch.name)
		if !p.closed {
			ch.node.send(ch.name, false)
		}
	}
}

// signalOne wakes the oldest waiter of Client.acquire (see waiter.turns)
// without a pending wake-up, and every other waiter (a Redlock's, which
// keeps a wake-up it does not use instead of passing it on, so it must not
// take the one turn of the others).
func signalOne(ws []*waiter) {
	one := false
	for _, w := range ws {
		if w.turns && one {
			continue
		}
		select {
		case w.sig <- struct{}{}:
			w.delivery = false
			one = one || w.turns
		default:
		}
	}
}

func signalAll(ws []*waiter) {
	for _, w := range ws {
		select {
		case w.sig <- struct{}{}:
			w.delivery = false
		default:
		}
	}
}

// receive reads one subscriber connection until the Client closes.
func (p *pubsub) receive(n *psNode) {
	defer p.wg.Done()
	ctx := p.ctx
	backoff := 10 * time.Millisecond
	pinged := false   // a ping is unanswered
	dropping := false // the connection is to be dropped
	for {
		var msg any
		var err error
		if pinged || dropping {
			// A read that times out by its ctx's deadline, not by a
			// timeout of its own, makes go-redis take the timeout for a
			// broken connection, close it and reconnect: this goroutine's
			// way to drop a connection, whatever the client's timeouts.
			// The read awaiting the health ping's reply ends a health
			// interval on; the read of a connection to drop now (its ctx
			// already past) returns what is buffered first, then fails
			// without touching the socket.
			deadline := time.Now().Add(p.healthInterval())
			if dropping {
				deadline = time.Now().Add(-time.Second)
			}
			rctx, cancel := context.WithDeadline(ctx, deadline)
			msg, err = n.ps.ReceiveTimeout(rctx, 0)
			cancel()
		} else {
			msg, err = n.ps.ReceiveTimeout(ctx, p.healthInterval())
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			select {
			case <-n.stop:
				return // retired (see follow)
			default:
			}
			var ne net.Error
			if dropping && !isReplyError(err) {
				// Dropped (see above). Or no connection was left to drop:
				// the read dialled under its past deadline, and the dial
				// failed, with a timeout or whatever error a custom dialer
				// gives (taken for one, no read would ever dial under a
				// live ctx again).
				dropping = false
			} else if errors.As(err, &ne) && ne.Timeout() {
				if !pinged {
					// The next read sees the reply, or a broken connection.
					pinged = true
					perr := n.ps.Ping(ctx)
					if perr == nil || ctx.Err() != nil {
						continue
					}
					// The ping's write failed: go-redis dropped the
					// connection inside Ping (and may have dialled a new
					// one), so no read of ours sees it fail. The
					// confirmations it owed are gone all the same.
					p.c.opts.logger.Debug("redlatch: subscriber health ping failed; reconnecting", "error", perr)
					select {
					case <-n.stop:
						return // retired (see follow)
					default:
					}
				} else {
					// No reply to the ping for a whole interval: the
					// connection is half-open (the server's host died, or a
					// partition swallowed its close), and TCP may take many
					// minutes to notice. The read's timeout dropped it (see
					// above): go-redis reconnects, subscribes again, and
					// the confirmations wake every waiter to retry.
					p.c.opts.logger.Debug("redlatch: subscriber connection unresponsive; reconnecting")
				}
			} else if isReplyError(err) {
				// A reply to a command, not a broken connection: the MOVED
				// answering the unsubscribe of a channel whose slot moved.
				p.c.opts.logger.Debug("redlatch: subscriber command refused", "error", err)
				if n.sharded && p.refused(n, err) {
					continue
				}
				cmd := refusedCommand(err)
				if cmd == "ping" {
					// The user may not PING: the refusal answers the
					// health ping all the same (the connection is alive).
					pinged = false
					continue
				}
				// A refused (S)UNSUBSCRIBE (the user may not run it) leaves
				// its channel subscribed and its confirmation owed: it is
				// dropped below, as any other refusal.
				if strings.HasPrefix(err.Error(), "NOPERM") && cmd != "unsubscribe" && cmd != "sunsubscribe" {
					// The user may not subscribe to a channel (an ACL
					// channel pattern): a drop cannot help, go-redis would
					// subscribe the same set again, forbidden channel and
					// all, in one SUBSCRIBE refused whole, and every
					// other channel of the connection would go deaf with
					// it. The forbidden channel's waiters are bounded by
					// the lease.
					p.c.opts.logger.Warn("redlatch: subscriber command refused", "error", err)
					if n.resubscribed.Swap(false) {
						// The refusal answers go-redis's re-subscription
						// of the whole set after a reconnection, which
						// the forbidden channel still is in: refused
						// whole, it left nothing subscribed. Subscribe
						// each channel again on its own (as after a
						// CROSSSLOT), and the confirmations wake the
						// waiters; the forbidden one is refused alone.
						p.mu.Lock()
						for name, ch := range p.chans {
							if ch.node == n && !p.closed {
								n.send(name, true)
							}
						}
						p.mu.Unlock()
					}
					continue
				}
				// Any other refusal (BUSY while a script runs too long,
				// LOADING, …) names no channel: the confirmation one of our
				// (un)subscribes was owed will never come, and what the
				// server has subscribed is unknown (a refused UNSUBSCRIBE
				// leaves its channel subscribed; a refused re-subscription
				// after a reconnection, every channel unsubscribed). Drop
				// the connection (see above; the replies buffered behind
				// the refusal are read first): go-redis subscribes its set
				// again, and the confirmations wake every waiter to retry.
				dropping = true
				continue
			}
			pinged = false
			// The connection broke; go-redis reconnects and subscribes
			// again on the next read. Pending confirmations are gone. A
			// sharded node's master may be dead for good, its slots taken
			// over by a replica: follow them.
			n.broken.Store(true)
			n.resubscribed.Store(true)
			p.mu.Lock()
			clear(n.inflight)
			if n.sharded && !n.following && !p.closed {
				n.following = true
				p.wg.Add(1)
				go p.follow(n)
			}
			p.mu.Unlock()
			p.c.opts.logger.Debug("redlatch: subscriber connection lost", "error", err)
			select {
			case <-ctx.Done():
				return
			case <-n.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff, pinged = 10*time.Millisecond, false
		n.broken.Store(false)
		switch m := msg.(type) {
		case *redis.Subscription:
			p.confirm(n, m)
		case *redis.Message:
			p.dispatch(m.Channel, m.Payload)
		}
	}
}

// subscriberDial marks the context of the plain subscriber connection's
// commands, with which go-redis dials it.
type subscriberDial struct{}

// failoverHook follows a sentinel failover client's master with the plain
// subscriber connection. go-redis moves the client's command connections
// to the new master when the sentinel announces a failover, but not a
// subscriber connection: that one stays on the old master, which keeps
// running as a master until the sentinel demotes it (seconds later, or
// never while the sentinel cannot reach it), so the wake-ups published on
// the new master do not reach this Client's waiters, who sleep to their
// lease or re-check bound. The hook sees every connection the client dials:
// a command connection dialled to another server than the subscriber's
// drops the subscriber connection, once, and go-redis dials it again
// through the sentinel, to the new master; the re-subscriptions' confirmations
// wake every waiter to retry (a wake-up published meanwhile was lost).
//
// A go-redis client keeps its hooks for good: it gets one hook, installed
// by the first Client on it, which serves the Clients open on it then.
type failoverHook struct {
	mu sync.Mutex
	ps map[*pubsub]struct{}
}

// failoverHooks maps each failover client a Client was opened on to its
// hook (weakly: a go-redis client dropped by its user is not kept).
var failoverHooks sync.Map // weak.Pointer[redis.Client] → *failoverHook

// watchFailover makes p follow the master of rdb, a sentinel failover
// client (see failoverHook), until p.unwatch.
func watchFailover(rdb *redis.Client, p *pubsub) {
	h, first := hookOnce(&failoverHooks, rdb, &failoverHook{ps: make(map[*pubsub]struct{})})
	fh := h.(*failoverHook)
	fh.mu.Lock()
	fh.ps[p] = struct{}{}
	fh.mu.Unlock()
	if first {
		rdb.AddHook(fh)
	}
	p.unwatch = func() {
		fh.mu.Lock()
		delete(fh.ps, p)
		fh.mu.Unlock()
	}
}

func (h *failoverHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := next(ctx, network, addr)
		if err == nil && conn != nil && conn.RemoteAddr() != nil {
			remote := conn.RemoteAddr().String()
			h.mu.Lock()
			ps := make([]*pubsub, 0, len(h.ps))
			for p := range h.ps {
				ps = append(ps, p)
			}
			h.mu.Unlock()
			for _, p := range ps {
				p.dialled(ctx, remote)
			}
		}
		return conn, err
	}
}

func (h *failoverHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (h *failoverHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// dialled records a connection of a failover client to addr (see
// failoverHook).
func (p *pubsub) dialled(ctx context.Context, addr string) {
	if mine := ctx.Value(subscriberDial{}); mine != nil {
		if mine == p {
			p.subAddr.Store(&addr)
		}
		return // another Client's subscriber connection
	}
	sub := p.subAddr.Load()
	if sub == nil || *sub == "" || *sub == addr {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.nodes[""]
	if n == nil || p.closed || !p.subAddr.CompareAndSwap(sub, new(string)) {
		return
	}
	p.wg.Add(1)
	go func() { // not under go-redis's dial
		defer p.wg.Done()
		// A ReplicaOnly client dials each connection to a random replica,
		// with no failover: it has no master to follow. (The Client's ctx:
		// a dial for ROLE is not the subscriber's.)
		if role, err := p.c.rdb.Do(p.c.ctx, "ROLE").Slice(); err == nil && len(role) > 0 && role[0] == "slave" {
			p.unwatch()
			return
		}
		p.c.opts.logger.Debug("redlatch: commands reach another server than the subscriber (a failover); reconnecting it",
			"subscriber", *sub, "commands", addr)
		dropConnection(p.ctx, n.ps)
		// As after a failed write of the writer: the reader may be between
		// reads and read the new connection next, never seeing the old one
		// fail, so the confirmations the old connection owed are forgotten
		// here (left owed, a later (un)subscribe of their channel would take
		// its confirmation for theirs, and that channel never be ready).
		n.resubscribed.Store(true)
		p.mu.Lock()
		clear(n.inflight)
		p.mu.Unlock()
	}()
}

// refusedCommand returns the command a NOPERM reply says the user may not
// run ("... no permissions to run the 'ping' command"), lower case, or ""
// (another reply, or a channel the user may not access).
func refusedCommand(err error) string {
	msg := err.Error()
	if !strings.HasPrefix(msg, "NOPERM") {
		return ""
	}
	_, rest, ok := strings.Cut(msg, "to run the '")
	if !ok {
		return ""
	}
	cmd, _, _ := strings.Cut(rest, "'")
	return strings.ToLower(cmd)
}

// dropConnection makes go-redis close ps's connection and reconnect, from
// another goroutine than ps's reader (which drops it by a read, see
// receive): a ping written under a deadline already past fails at once, and
// go-redis then drops the connection (it treats any non-read-timeout
// failure as a bad connection) and dials a new one, re-subscribing every
// channel, at the next read at the latest. It needs a client that sets
// write deadlines (see writeDeadlines).
func dropConnection(ctx context.Context, ps *redis.PubSub) {
	past, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	defer cancel()
	_ = ps.Ping(past)
}

// confirm handles a (un)subscribe confirmation. The first confirmation of a
// channel makes it ready; a later one is a re-subscription after a
// reconnection, and wakes every waiter of the channel to retry, since a
// message may have been lost while the connection was down.
func (p *pubsub) confirm(n *psNode, m *redis.Subscription) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n.inflight[m.Channel] == 0 && m.Kind == "sunsubscribe" {
		// Not ours: the server dropped the subscription because the
		// channel's slot moved to another master. Follow it there.
		if ch := p.chans[m.Channel]; ch != nil && ch.node == n && !p.closed {
			p.wg.Add(1)
			go p.rehome(ch, n)
		}
		return
	}
	if n.inflight[m.Channel] > 0 {
		n.inflight[m.Channel]--
		if n.inflight[m.Channel] > 0 {
			return // an older command's confirmation
		}
		delete(n.inflight, m.Channel)
	}
	if m.Kind != "subscribe" && m.Kind != "ssubscribe" {
		return
	}
	ch := p.chans[m.Channel]
	if ch == nil || ch.node != n {
		return
	}
	if !ch.isReady {
		ch.isReady = true
		close(ch.ready)
		for _, w := range ch.waiters {
			if w.unconfirmed {
				w.unconfirmed = false
				signalAll([]*waiter{w})
			}
		}
		return
	}
	signalAll(ch.waiters)
}

// dispatch delivers a wake-up message to the local waiters of its channel.
func (p *pubsub) dispatch(channel, payload string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ch := p.chans[channel]
	if ch == nil {
		return
	}
	if named, ok := strings.CutPrefix(payload, wakeWaiterPrefix); ok {
		id, grant, _ := strings.Cut(named, ":")
		for _, w := range ch.waiters {
			if w.id == id {
				w.grant = grant
				signalAll([]*waiter{w})
			}
		}
	} else if payload == wakeAll {
		signalAll(ch.waiters)
	} else if _, own := ch.yields[payload]; own {
		ch.yields[payload] = true // this Client's own release: others go first
	} else {
		signalOne(ch.waiters)
	}
}

// close ends every wait with ErrClosed, closes the subscriber connections
// and waits for their goroutines, at most subscriberCloseWait.
func (p *pubsub) close() {
	if p.unwatch != nil {
		p.unwatch()
	}
	p.mu.Lock()
	p.closed = true
	close(p.closing)
	nodes := make([]*psNode, 0, len(p.nodes))
	for _, n := range p.nodes {
		nodes = append(nodes, n)
	}
	p.mu.Unlock()
	// go-redis's PubSub.Close waits for a reconnection in progress (its
	// dial and handshake hold the PubSub's mutex), which a server that does
	// not answer holds up until the client's read deadline: the subscriber's
	// ctx has none, and go-redis does not end a read when it is cancelled.
	// Close leaves such a connection (and the node's goroutines) to end on
	// their own then: p.closing and the Client's ctx end them. The
	// connections are closed all at once: one held up so must not keep
	// those to the other nodes open until then.
	done := make(chan struct{})
	go func() {
		defer close(done)
		var closing sync.WaitGroup
		for _, n := range nodes {
			closing.Add(1)
			go func() {
				defer closing.Done()
				_ = n.ps.Close()
			}()
		}
		closing.Wait()
		p.wg.Wait()
	}()
	t := time.NewTimer(subscriberCloseWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// subscriberCloseWait bounds how long Close waits for the subscriber
// connections to close and their goroutines to exit (see pubsub.close).
const subscriberCloseWait = 200 * time.Millisecond

// attemptFunc makes one acquisition attempt. It returns whether it
// succeeded and, when not, how long until the current holder's lease ends
// (the bound of the next sleep).
type attemptFunc func(ctx context.Context) (ok bool, retry time.Duration, err error)

// acquire runs try until it succeeds, sleeping between attempts until a
// wake-up on channel or the retry bound; with block false it makes a single
// attempt. The waiter joins the channel before its second attempt, so no
// release after the first failed attempt goes unnoticed.
//
// With queue set (exclusive locks), a blocking call that finds local
// waiters already queued on channel queues behind them without an attempt
// of its own: each release lets one waiter in, and each passes the turn on.
// Shared holds (read locks, permits, latches) leave queue unset: one
// wake-up may let every waiter in at once, and a newcomer queued without an
// attempt would wait for the next one.
//
// kin, when not nil, marks the waiter as one of its owner's (see kinship),
// which the owner's next acquisition on this Client wakes to re-enter.
//
// When an attempt fails without a reply from Redis (a network or context
// error), the attempt may have succeeded on the server: undo is then called
// with a fresh bounded context to release whatever that attempt took.
func (c *Client) acquire(ctx context.Context, channel string, kin *kinship, block, queue bool, try attemptFunc, undo func(context.Context), xfer *transfer) (bool, error) {
	// Close waits for this call's cleanup below (a give-back of what it
	// took or was handed after Close began).
	if !c.enterWait() {
		return false, ErrClosed
	}
	defer c.leaveWait()
	var w *waiter
	acquired := false
	defer func() {
		if w == nil {
			return
		}
		var took int64
		if acquired && xfer != nil && xfer.token != nil {
			took = xfer.token()
		}
		if acquired {
			c.ps.mu.Lock()
			w.acquired, w.took = true, took
			c.ps.mu.Unlock()
		}
		// Leaving without the lock: pass the turn on, so that a waiter
		// queued behind this one (whose own bound may be longer than the
		// holder's lease) retries now.
		w.leave(!acquired)
		c.ps.mu.Lock()
		unsure := w.unsure && !acquired // a transfer with a lost reply may have reached it
		// The same, but the waiter took a hold with an attempt of its own (a
		// re-entry of the hold the transfer ended, its reply on the way when
		// the Unlock failed): the Unlock left that to it (see excl.unlockDone).
		unsureHeld := w.unsure && acquired && took != 0
		c.ps.mu.Unlock()
		t, _ := w.takeTransfer()
		if unsureHeld && t == 0 && xfer.giveBackUnless != nil {
			detached(ctx, func(ctx context.Context) { xfer.giveBackUnless(ctx, took) })
		}
		if undo != nil && (unsure || t != 0 && (!acquired || (took != 0 && t != took))) {
			// A transfer arrived as the wait ended, or after the waiter
			// took the lock with an attempt of its own (a re-entry of the
			// hold the transfer ended): give it back.
			detached(ctx, func(ctx context.Context) {
				if t != 0 && xfer.giveBack != nil {
					// That transfer's hold only: the waiter's own attempt may
					// have taken another (the transferred one was force-unlocked).
					xfer.giveBack(ctx, t)
				} else {
					undo(ctx)
				}
			})
		}
	}()
	// transferred reports whether an Unlock of this Client handed the lock
	// to the waiter while it slept.
	transferred := func() bool {
		if w == nil || xfer == nil {
			return false
		}
		t, sent := w.takeTransfer()
		if t == 0 {
			return false
		}
		xfer.take(t, sent)
		acquired = true
		return true
	}
	// closedMeanwhile reports whether the Client was closed while the
	// acquisition that just succeeded was on the way: the wait was in
	// progress at Close, so it returns ErrClosed, and what it took is given
	// back (with a fresh bounded context): no watchdog would renew it, and
	// its handle could not release it (every method returns ErrClosed).
	closedMeanwhile := func() bool {
		if !c.closed.Load() || undo == nil {
			return false
		}
		acquired = false
		detached(ctx, undo)
		return true
	}
	joined := func(nw *waiter) *waiter {
		if nw != nil {
			c.ps.setTransfer(nw, xfer, kin)
		}
		return nw
	}
	if block && queue {
		// Local waiters already queue for this lock: the lock is busy, and
		// any release wakes one of them. Queue behind them instead of
		// barging in with an attempt that would fail: it saves a round
		// trip and keeps local arrivals in order.
		if w = joined(c.ps.joinQueuedBehind(channel)); w != nil && (kin == nil || kin.held == nil || !kin.held()) {
			if _, err := w.wait(ctx, c.opts.watchdogTimeout/3); err != nil {
				return false, err
			}
			if transferred() {
				if closedMeanwhile() {
					return false, ErrClosed
				}
				return true, nil
			}
		}
	}
	if block && !queue && w == nil {
		// The channel is subscribed already (other local waiters wait on
		// it): join before the first attempt. A release after that attempt
		// then wakes this waiter too, and no second attempt is needed to
		// cover the time between the first and the join.
		w = joined(c.ps.joinQueued(channel))
	}
	for {
		if ctx.Err() != nil {
			// No attempt now: go-redis would not send it (it checks ctx
			// before taking a connection), and failedAttempt would undo
			// it for nothing, a round trip that leaves a tombstone.
			return false, newWaitError(ctx, nil)
		}
		ok, retry, err := c.attempt(ctx, try)
		switch {
		case err != nil:
			return false, c.failedAttempt(ctx, err, undo)
		case ok:
			acquired = true
			if closedMeanwhile() {
				return false, ErrClosed
			}
			return true, nil
		case !block:
			return false, nil
		case w == nil:
			if w, err = c.ps.join(ctx, channel, retry); err != nil {
				return false, err
			}
			joined(w)
		default:
			if _, err = w.wait(ctx, retry); err != nil {
				return false, err
			}
			if transferred() {
				if closedMeanwhile() {
					return false, ErrClosed
				}
				return true, nil
			}
		}
	}
}

// attempt runs try with ctx, cancelled at Close too. go-redis does not end
// a read in flight when its ctx is cancelled, but it retries no command
// whose ctx was: without it an attempt whose read timed out on a server
// that does not answer was sent again (on a new connection, whose
// handshake waits for a read timeout of its own), and the wait ended at
// Close outlived its read deadline (see Client.Close).
func (c *Client) attempt(ctx context.Context, try attemptFunc) (bool, time.Duration, error) {
	actx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel)
	defer func() {
		stop()
		cancel()
	}()
	return try(actx)
}

// failedAttempt undoes an attempt whose outcome is unknown and returns the
// error the caller sees.
func (c *Client) failedAttempt(ctx context.Context, err error, undo func(context.Context)) error {
	if outcomeUnknown(err) && undo != nil {
		c.cleanupAfter(ctx, err, undo)
	}
	// Converted in the wait error too: a WRONGTYPE reply that came as ctx
	// ended still matches ErrWrongType.
	err = convertErr(err)
	if ctxEnded(ctx) {
		return newWaitError(ctx, err)
	}
	if c.closed.Load() {
		return ErrClosed
	}
	return err
}

// outcomeUnknown reports whether an attempt that failed with err may have
// taken what it asked for, unknown to its caller: not a reply from Redis,
// nor an ErrNotReplicated attempt, released already (see replicated). A
// transient refusal (BUSY, LOADING: see isBusyOrLoading) is a reply, but maybe to
// go-redis's resend of an attempt whose first run took the lock (or queued
// the writer) and whose reply was lost: go-redis does not retry BUSY
// (TestAcquireRunThenRefusedBusyIsUndone). So is a refusal by a migrating
// slot (TRYAGAIN, or a MOVED or ASK go-redis did not follow) that lasted
// past tryAgainWait with ctx alive: an earlier send, inside go-redis's
// retries, may have run (TestReplicaSyncRunThenRefusedPastTryAgainWaitIsUndone).
func outcomeUnknown(err error) bool {
	return (!isReplyError(err) || isBusyOrLoading(err) || refusedInMigration(err)) && !errors.Is(err, ErrNotReplicated)
}

// cleanupAfter runs cleanup (an undo, a FairMutex withdrawal, an RWMutex
// writer leaving the queue) of an acquisition whose call fails, its last
// attempt with err, with a fresh bounded context: in the call, or in the
// background when a migrating slot refused that attempt: until the call's
// ctx ended (see refusedErr; its last send did not run, but an earlier one
// may have, its reply lost, that go-redis sent again itself, refused then,
// unseen by tryAgainHook), or past tryAgainWait with ctx alive (a TRYAGAIN,
// MOVED or ASK reply). The cleanup, a release script, is refused too while
// the slot migrates, for the whole cleanup timeout, which must not hold the
// call past its ctx. Close waits for it.
func (c *Client) cleanupAfter(ctx context.Context, err error, cleanup func(context.Context)) {
	if !(refusedUntilCtxEnded(err) || refusedInMigration(err)) || !c.enterWait() {
		detached(ctx, cleanup)
		return
	}
	go func() {
		defer c.leaveWait()
		detached(ctx, cleanup)
	}()
}

// ctxEnded reports whether ctx has ended. A read that failed at ctx's
// deadline (go-redis puts it on the socket: a WAIT on a pinned connection,
// say) may return before ctx's own timer has fired: once the deadline has
// passed, ctx is waited for, so that the error made from it is the wait's.
func ctxEnded(ctx context.Context) bool {
	if ctx.Err() != nil {
		return true
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		<-ctx.Done()
		return true
	}
	return false
}

// retryBound turns a holder's remaining lease (PTTL, ms) into the bound of
// the next sleep: at least a millisecond; a lock without a lease (not written
// by redlatch) is retried every watchdog period.
func (c *Client) retryBound(pttl int64) time.Duration {
	switch {
	case pttl == -1:
		return c.opts.watchdogTimeout / 3
	case pttl < 1:
		return time.Millisecond
	}
	return msDuration(pttl)
}

// msDuration turns ms milliseconds into a Duration, the longest one for an
// expiry set by hand centuries ahead (in nanoseconds it would overflow to a
// negative sleep, and a waiter would spin).
func msDuration(ms int64) time.Duration {
	if ms > int64(math.MaxInt64/time.Millisecond) {
		return math.MaxInt64
	}
	return time.Duration(ms) * time.Millisecond
}
