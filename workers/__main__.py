from workers.cli import main

# Guarded: vLLM starts its engine in spawned processes, which re-import the main module.
if __name__ == "__main__":
    main()
