// Command quickstart takes a reentrant lock twice, shows its fencing token,
// and shows a second owner being kept out until the lock is released.
//
//	go run ./examples/quickstart              # embedded miniredis
//	REDIS_ADDR=localhost:6379 go run ./examples/quickstart
package main

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

func main() {
	rdb, done := demo.Redis()
	defer done()
	ctx := context.Background()

	client := redlatch.New(rdb)
	defer client.Close()

	lock := client.ReentrantMutex("quickstart:invoice-42")
	if err := lock.Lock(ctx); err != nil {
		log.Fatal(err)
	}
	first := lock.Token()
	fmt.Printf("locked; fencing token %d\n", first)

	// Re-entering is counted and keeps the token.
	if err := lock.Lock(ctx); err != nil {
		log.Fatal(err)
	}
	n, _ := lock.HoldCount(ctx)
	fmt.Printf("re-entered; hold count %d, token still %d\n", n, lock.Token())

	// Another owner (another service instance, so another Client) is kept
	// out. (A waiter of the same Client would get the lock by a local
	// transfer inside the Unlock's script, with no pub/sub message.)
	client2 := redlatch.New(rdb)
	defer client2.Close()
	other := client2.ReentrantMutex("quickstart:invoice-42")
	ok, err := other.TryLock(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("another owner's TryLock while held: %v\n", ok)

	// The other owner waits; it is woken by pub/sub when the lock is freed.
	got := make(chan time.Time)
	go func() {
		if err := other.Lock(ctx); err != nil {
			log.Fatal(err)
		}
		got <- time.Now()
	}()

	time.Sleep(100 * time.Millisecond)
	_ = lock.Unlock(ctx)
	n, _ = lock.HoldCount(ctx)
	fmt.Printf("unlocked once; hold count %d, the lock is still ours\n", n)
	released := time.Now()
	_ = lock.Unlock(ctx)
	fmt.Println("unlocked twice; the lock is free")

	at := <-got
	fmt.Printf("the other owner got the lock %v after the release, token %d (higher: %v)\n",
		at.Sub(released).Round(time.Millisecond), other.Token(), other.Token() > first)
	if err := other.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("done")
}
