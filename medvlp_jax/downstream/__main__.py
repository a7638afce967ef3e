from medvlp_jax.downstream.runner import main

main()
