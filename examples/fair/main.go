// Command fair shows a FairMutex granting its lock in arrival order: eight
// workers on two Clients (two service instances) queue one after another while the
// lock is held, and get it one by one, first come, first served, each with a
// higher fencing token.
//
//	go run ./examples/fair              # embedded miniredis
//	REDIS_ADDR=localhost:6379 go run ./examples/fair
package main

import (
	"context"
	"fmt"
	"log"
	"sync"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

func main() {
	rdb, done := demo.Redis()
	defer done()
	ctx := context.Background()

	clients := []*redlatch.Client{redlatch.New(rdb), redlatch.New(rdb)}
	defer func() {
		for _, c := range clients {
			_ = c.Close()
		}
	}()
	name := fmt.Sprintf("fair-demo:%d", time.Now().UnixNano())

	holder := clients[0].FairMutex(name)
	if err := holder.Lock(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("the lock is held (token %d); workers queue behind it\n", holder.Token())

	var wg sync.WaitGroup
	var mu sync.Mutex // orders the output lines
	for i := 1; i <= 8; i++ {
		m := clients[i%2].FairMutex(name)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := m.Lock(ctx); err != nil {
				log.Fatal(err)
			}
			mu.Lock()
			fmt.Printf("worker %d (client %d) got the lock, token %d\n", i, i%2, m.Token())
			mu.Unlock()
			time.Sleep(10 * time.Millisecond) // the critical section
			if err := m.Unlock(ctx); err != nil {
				log.Fatal(err)
			}
		}()
		fmt.Printf("worker %d (client %d) asks for the lock\n", i, i%2)
		// Start the next worker only once this one is in the queue
		// ({name}:fairq): a fixed sleep orders them only when Redis is fast.
		for rdb.ZCard(ctx, "{"+name+"}:fairq").Val() < int64(i) {
			time.Sleep(time.Millisecond)
		}
	}

	// A newcomer cannot jump the queue, not even with TryLock.
	ok, err := clients[1].FairMutex(name).TryLock(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("a newcomer's TryLock while workers wait: %v\n", ok)

	if err := holder.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("released: the lock is handed to the head of the queue")
	wg.Wait()
	fmt.Println("done: workers got the lock in the order they queued")
}
